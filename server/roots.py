"""Allowed scan roots and the checks a requested path must pass, in a fixed order.

The order matters for safety: the root check comes before any existence check, so that a
caller cannot learn what exists outside the roots from the status codes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from typing import Protocol

from .errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from .jobs import Job, JobState

__all__ = ["MAX_PATH_BYTES", "RootPolicy", "jobs_within_roots"]

MAX_PATH_BYTES = 4096


class RootPolicy:
    """The directories scans may read, and the checks that keep them inside.

    Args:
        roots: allowed root directories; each must be an absolute path. They are kept both
            as given (normalised) and with symlinks resolved.

    Raises:
        ValueError: a root is not absolute, or no root is given.
    """

    def __init__(self, roots: Iterable[str]) -> None:
        given = [os.path.normpath(r) for r in roots]
        if not given:
            raise ValueError("at least one allowed root is required")
        for root in given:
            if not os.path.isabs(root):
                raise ValueError(f"allowed root must be absolute: {root!r}")
        self.resolved: tuple[str, ...] = tuple(dict.fromkeys(os.path.realpath(r) for r in given))
        self._lexical = tuple(dict.fromkeys([*given, *self.resolved]))
        self.resolved_bytes: tuple[bytes, ...] = tuple(os.fsencode(r) for r in self.resolved)

    def check(self, raw: str) -> str:
        """Validate a requested scan directory and return it normalised.

        Raises:
            InvalidArgument: empty, relative, over-long or NUL-containing path.
            PermissionDenied: outside every root, before or after resolving symlinks.
            NotFound: the path does not exist.
            FailedPrecondition: the path is not a directory.
        """
        path = self.check_syntax(raw)
        if not _inside(path, self._lexical):
            raise PermissionDenied(f"{path} is outside the allowed roots")
        real = os.path.realpath(path)
        if not _inside(real, self.resolved):
            raise PermissionDenied(f"{path} resolves outside the allowed roots")
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist", reason="PATH_NOT_FOUND") from None
        except OSError as exc:
            raise FailedPrecondition(
                f"{path} cannot be read: {exc.strerror}", reason="PATH_UNREADABLE"
            ) from None
        if not stat.S_ISDIR(mode):
            raise FailedPrecondition(f"{path} is not a directory", reason="NOT_A_DIRECTORY")
        return path

    @staticmethod
    def check_syntax(raw: str) -> str:
        """Check a path's form without touching the file system; return it normalised.

        Raises:
            InvalidArgument: empty, relative, over-long or NUL-containing path.
        """
        if not raw:
            raise InvalidArgument("path is required", field="path", reason="PATH_REQUIRED")
        if "\x00" in raw:
            raise InvalidArgument("path contains a NUL byte", field="path", reason="PATH_INVALID")
        if len(os.fsencode(raw)) > MAX_PATH_BYTES:
            raise InvalidArgument(
                f"path is longer than {MAX_PATH_BYTES} bytes", field="path", reason="PATH_TOO_LONG"
            )
        if not raw.startswith("/"):
            raise InvalidArgument("path must be absolute", field="path", reason="PATH_NOT_ABSOLUTE")
        # normpath folds "//", "." and "..": "/media/../etc" becomes "/etc" before the root check.
        return "/" + os.path.normpath(raw).lstrip("/")

    def listed(self) -> tuple[bytes, ...]:
        """The roots as catalogued paths may start: as given and resolved. Listings show only
        what lies below one of them, whatever an earlier configuration catalogued."""
        return tuple(os.fsencode(r) for r in self._lexical)

    def allows(self, real_path: bytes) -> bool:
        """True if an already resolved path lies inside a root."""
        return any(
            real_path == r or real_path.startswith(r.rstrip(b"/") + b"/")
            for r in self.resolved_bytes
        )


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class _JobLister(Protocol):
    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]: ...


_MAX_PAGE_READS = 20


async def jobs_within_roots(
    queue: _JobLister, roots: RootPolicy, *, state: JobState | None, page_size: int,
    page_token: str,
) -> tuple[list[Job], str]:  # fmt: skip
    """A page of the queue's jobs, keeping only those whose path lies under the roots.

    Jobs of roots that a restart removed (or of replicas with other roots) stay hidden. The
    queue is asked for exactly the jobs still missing, so that its token resumes right after
    the last job read; a page may come back short, with a token, when many jobs are hidden.
    """
    allowed = roots.listed()
    jobs: list[Job] = []
    token = page_token
    for _ in range(_MAX_PAGE_READS):
        page, token = await queue.list_jobs(
            state=state, page_size=page_size - len(jobs), page_token=token
        )
        jobs += [j for j in page if _inside(j.spec.path, [os.fsdecode(r) for r in allowed])]
        if not token or len(jobs) >= page_size:
            break
    return jobs, token
