"""Allowed scan roots and the checks a requested path must pass, in a fixed order.

The order matters for safety: the root check comes before any existence check, so that a
caller cannot learn what exists outside the roots from the status codes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from .fsopen import open_beneath, real_path
from .jobs import Job, JobState

__all__ = ["MAX_PATH_BYTES", "Folder", "RootPolicy", "jobs_within_roots"]

MAX_PATH_BYTES = 4096
_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Folder:
    """A folder to scan, found by descriptor beneath an allowed root.

    Attributes:
        path: the folder as requested, normalised: the names the catalog keeps.
        root: the resolved allowed root it lies beneath.
        relative: its place beneath ``root``, free of symlinks (``b""`` for the root itself).
    """

    path: bytes
    root: bytes
    relative: bytes


class RootPolicy:
    """The directories scans may read, and the checks that keep them inside.

    Args:
        roots: allowed root directories; each must be an absolute path. They are kept both
            as given (normalised) and with symlinks resolved.
        resolutions: each root (in the order of ``roots``) with its symlinks resolved, as
            found by someone else; by default resolved here. A root on a share that did not
            answer is its own resolution: paths through a symlink to it are then refused.

    Raises:
        ValueError: a root is not absolute, no root is given, or the resolutions do not
            match the roots.
    """

    def __init__(self, roots: Iterable[str], resolutions: Sequence[str] | None = None) -> None:
        given = [os.path.normpath(r) for r in roots]
        if not given:
            raise ValueError("at least one allowed root is required")
        for root in given:
            if not os.path.isabs(root):
                raise ValueError(f"allowed root must be absolute: {root!r}")
        if resolutions is None:
            resolutions = [os.path.realpath(r) for r in given]
        elif len(resolutions) != len(given):
            raise ValueError("one resolution per root is required")
        self.given = tuple(given)
        self.resolutions = tuple(os.path.normpath(r) for r in resolutions)
        self.resolved: tuple[str, ...] = tuple(dict.fromkeys(self.resolutions))
        self._lexical = tuple(dict.fromkeys([*given, *self.resolved]))
        self.resolved_bytes: tuple[bytes, ...] = tuple(os.fsencode(r) for r in self.resolved)
        # Each root as a symlink target may name it (as given, or resolved), and where it is.
        real = {**{r: r for r in self.resolved}, **dict(zip(given, self.resolutions, strict=True))}
        self._link_forms: tuple[tuple[bytes, bytes], ...] = tuple(
            (os.fsencode(form), os.fsencode(real[form])) for form in self._lexical
        )

    def check(self, raw: str) -> str:
        """Validate a requested scan directory and return it normalised.

        Raises:
            InvalidArgument: empty, relative, over-long or NUL-containing path.
            PermissionDenied: outside every root, before or after resolving symlinks.
            NotFound: the path does not exist.
            FailedPrecondition: the path is not a directory.
        """
        return os.fsdecode(self.locate(raw).path)

    def locate(self, raw: str) -> Folder:
        """Find a requested scan directory by descriptor beneath its root.

        The path is checked by name first (so that a path outside the roots is refused before
        any file-system access), then opened beneath its resolved root without following any
        symlink, and what the descriptor really is (``/proc/self/fd``) is checked again: a
        folder swapped for a symlink in between is refused, never followed.

        Raises:
            InvalidArgument: empty, relative, over-long or NUL-containing path.
            PermissionDenied: outside every root, before or after resolving symlinks.
            NotFound: the path does not exist.
            FailedPrecondition: the path is not a directory, or cannot be reached.
        """
        path = self.check_syntax(raw)
        if not _inside(path, self._lexical):
            raise PermissionDenied(f"{path} is outside the allowed roots")
        real = os.fsencode(os.path.realpath(path))
        root = self.root_of(real)
        if root is None:
            raise PermissionDenied(f"{path} resolves outside the allowed roots")
        folder = Folder(os.fsencode(path), root, real[len(root) :].lstrip(b"/"))
        try:
            seen = _open_real(folder)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if isinstance(exc, NotADirectoryError) and _is_file(real):
                raise FailedPrecondition(
                    f"{path} is not a directory", reason="NOT_A_DIRECTORY"
                ) from None
            raise NotFound(f"{path} does not exist", reason="PATH_NOT_FOUND") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise PermissionDenied(
                    f"{path} changed while it was opened: a symlink is not followed"
                ) from None
            raise FailedPrecondition(
                f"{path} cannot be read: {exc.strerror}", reason="PATH_UNREADABLE"
            ) from None
        if seen != os.path.normpath(os.path.join(root, folder.relative)) or not self.allows(seen):
            raise PermissionDenied(f"{path} resolves outside the allowed roots")
        return folder

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
        return self.root_of(real_path) is not None

    def root_of(self, real_path: bytes) -> bytes | None:
        """The outermost resolved root that holds the resolved path ``real_path``, or None."""
        inside = [r for r in self.resolved_bytes if _inside_bytes(real_path, r)]
        return min(inside, key=len) if inside else None

    def link_target(self, target: bytes) -> tuple[bytes, bytes] | None:
        """Where an absolute symlink target lies: (resolved root, path beneath it), or None.

        Matched by name against each root (as given or resolved), without looking anything
        up: a target that does not start with a root is outside, whatever exists there.
        """
        for form, resolved in self._link_forms:
            if _inside_bytes(target, form):
                return resolved, target[len(form) :].lstrip(b"/") or b"."
        return None


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _inside_bytes(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _open_real(folder: Folder) -> bytes:
    """Open ``folder`` beneath its root without following symlinks; what it really is."""
    root_fd = os.open(folder.root, _ROOT_FLAGS)
    try:
        fd = open_beneath(root_fd, folder.relative or b".", os.O_PATH | os.O_DIRECTORY)
    finally:
        os.close(root_fd)
    try:
        return real_path(fd)
    finally:
        os.close(fd)


def _is_file(real: bytes) -> bool:
    try:
        return not os.path.isdir(real) and os.path.lexists(real)
    except OSError:
        return False


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
