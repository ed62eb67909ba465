"""What every transport does with a caller's request before it reaches the queue.

The gRPC servicer and the HTTP adapter (Connect, gRPC-Web, REST) both convert their wire form
into plain values and call these, so that a request is checked the same way whichever door it
came through: field checks first, then the root check (in a thread: it touches the file
system), then the queue.
"""

from __future__ import annotations

import asyncio

from .errors import InvalidArgument
from .jobs import Job, JobSpec
from .queue import JobQueue
from .roots import RootPolicy

__all__ = [
    "MAX_JOB_ID",
    "MAX_PAGE_SIZE",
    "MAX_REQUEST_ID",
    "MAX_TIMEOUT_S",
    "job_id",
    "job_spec",
    "page_size",
    "submit_scan",
]

MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID = 128
MAX_JOB_ID = 64
MAX_TIMEOUT_S = 7 * 24 * 3600


def job_spec(
    path: str, *, recursive: bool = True, timeout_s: float | None = None, request_id: str = ""
) -> JobSpec:
    """Check a scan request's fields, without touching the file system.

    Args:
        path: the directory as the caller wrote it; returned normalised.
        recursive: descend into subdirectories.
        timeout_s: run-time limit in seconds; ``None`` or 0 means the server default.
        request_id: idempotency key, empty when not given.

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
    return JobSpec(normalised, recursive, timeout_s or None, request_id)


async def submit_scan(queue: JobQueue, roots: RootPolicy, spec: JobSpec) -> Job:
    """Check the path against the allowed roots, then queue the job.

    Raises:
        PermissionDenied, NotFound, FailedPrecondition: from ``RootPolicy.check``.
        ResourceExhausted, Unavailable, AlreadyExists: from the queue.
    """
    path = await asyncio.to_thread(roots.check, spec.path)
    return await queue.submit(JobSpec(path, spec.recursive, spec.timeout_s, spec.request_id))


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
