"""What every transport does with a caller's request before it reaches the queue.

The gRPC servicer and the HTTP adapter (Connect, gRPC-Web, REST) both convert their wire form
into plain values and call these, so that a request is checked the same way whichever door it
came through: field checks first, then the root check (in a helper process, with a deadline:
it touches the file system, which may be a share that stopped answering), then the queue.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .catalog import Catalog, FailurePage, Listing
from .errors import InvalidArgument, IoTimeout
from .jobs import Job, JobSpec, JobState
from .queue import JobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy, jobs_within_roots

__all__ = [
    "ANSWER_MARGIN_S",
    "MAX_JOB_ID",
    "MAX_PAGE_SIZE",
    "MAX_REQUEST_ID",
    "MAX_TIMEOUT_S",
    "check_root",
    "job_id",
    "job_spec",
    "list_file_errors",
    "list_jobs",
    "list_videos",
    "page_size",
    "submit_scan",
]

MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID = 128
MAX_JOB_ID = 64
MAX_TIMEOUT_S = 7 * 24 * 3600
# Time kept back from a caller's own deadline for the answer to reach it (a fifth of what is
# left when that is less): a check that runs out answers IO_TIMEOUT, not DEADLINE_EXCEEDED.
ANSWER_MARGIN_S = 0.25


def job_spec(
    path: str,
    *,
    recursive: bool = True,
    timeout_s: float | None = None,
    request_id: str = "",
    reprobe: bool = False,
) -> JobSpec:
    """Check a scan request's fields, without touching the file system.

    Args:
        path: the directory as the caller wrote it; returned normalised.
        recursive: descend into subdirectories.
        timeout_s: run-time limit in seconds; ``None`` or 0 means the server default.
        request_id: idempotency key, empty when not given.
        reprobe: probe every file again, unchanged or remembered as failed.

    Raises:
        InvalidArgument: bad path syntax, timeout out of range, over-long request id.
    """
    normalised = RootPolicy.check_syntax(path)
    if timeout_s is not None and not 0 <= timeout_s <= MAX_TIMEOUT_S:
        raise InvalidArgument(
            f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds", field="timeout"
        )
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id"
        )
    return JobSpec(normalised, recursive, timeout_s or None, request_id, reprobe)


async def submit_scan(
    queue: JobQueue, checks: RootChecks, spec: JobSpec, *, time_left_s: float | None = None
) -> Job:
    """Check the path against the allowed roots, then queue the job.

    Args:
        queue: where the job goes.
        checks: the root checks (``--io-timeout``).
        spec: the checked request (``job_spec``).
        time_left_s: the time left before the caller's own deadline, if it set one.

    Raises:
        PermissionDenied, NotFound, FailedPrecondition: from ``RootPolicy.check``.
        IoTimeout: the path did not answer in time (see ``check_root``).
        ResourceExhausted, Unavailable, AlreadyExists: from the queue.
    """
    path = await check_root(checks, spec.path, time_left_s=time_left_s)
    return await queue.submit(replace(spec, path=path))


async def check_root(checks: RootChecks, path: str, *, time_left_s: float | None = None) -> str:
    """``RootPolicy.check(path)`` with a deadline: ``--io-timeout``, or sooner when the
    caller's own deadline (``time_left_s``) is nearer, less ``ANSWER_MARGIN_S``, so that the
    caller hears why.

    Raises:
        PermissionDenied, NotFound, FailedPrecondition: from ``RootPolicy.check``.
        IoTimeout: the path did not answer in time: a share that is down, a disk that hangs.
        Unavailable: the check could not be made (its helper process cannot start).
    """
    timeout_s = None
    if time_left_s is not None:
        timeout_s = max(0.0, time_left_s - min(ANSWER_MARGIN_S, time_left_s / 5))
    try:
        return await checks.check(path, timeout_s=timeout_s)
    except IoTimeout as exc:
        raise IoTimeout(f"{path}: {exc.message}") from None


def job_id(raw: str) -> str:
    """A job id as given, once checked for presence and length.

    Raises:
        InvalidArgument: empty or longer than ``MAX_JOB_ID`` characters.
    """
    if not raw:
        raise InvalidArgument("job_id is required", field="job_id")
    if len(raw) > MAX_JOB_ID:
        raise InvalidArgument(f"job_id is longer than {MAX_JOB_ID} characters", field="job_id")
    return raw


def page_size(raw: int, *, default: int) -> int:
    """The page size to use: ``default`` for 0, at most ``MAX_PAGE_SIZE``.

    Raises:
        InvalidArgument: negative.
    """
    if raw < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(raw or default, MAX_PAGE_SIZE)


async def list_jobs(
    queue: JobQueue, roots: RootPolicy, *, state: JobState | None, page_size: int, page_token: str
) -> tuple[list[Job], str]:
    """A page of jobs, newest first, only those whose path lies under the current roots."""
    return await jobs_within_roots(
        queue, roots, state=state, page_size=page_size, page_token=page_token
    )


async def list_videos(
    catalog: Catalog, roots: RootPolicy, *, path_prefix: str, job_id: str, page_size: int,
    page_token: str, include_missing: bool,
) -> Listing:  # fmt: skip
    """A page of the catalog by path, only under the current roots; missing videos only when
    asked for; with the catalog's change sequence as of the page."""
    return await catalog.catalog_listing(
        path_prefix=os.fsencode(path_prefix),
        job_id=job_id,
        page_size=page_size,
        page_token=page_token,
        include_missing=include_missing,
        roots=roots.listed(),
    )


async def list_file_errors(
    catalog: Catalog, roots: RootPolicy, *, path_prefix: str, page_size: int, page_token: str
) -> FailurePage:
    """A page of the files that could not be probed, by path, only under the current roots."""
    return await catalog.list_failures(
        path_prefix=os.fsencode(path_prefix),
        page_size=page_size,
        page_token=page_token,
        roots=roots.listed(),
    )
