"""What the service does, whatever the transport: every check of a request, then the queue
or the catalog.

A transport (the gRPC servicer in ``server.service``, an HTTP adapter) converts its messages
into these calls' plain arguments and maps the domain errors they raise to its status codes;
it decides nothing else. So a request is judged the same way whichever door it came in by.
"""

from __future__ import annotations

import asyncio
import os

from .catalog import Catalog, VideoPage
from .errors import InvalidArgument
from .jobs import Job, JobSpec, JobState
from .queue import JobQueue
from .roots import RootPolicy
from .watch import Subscription

__all__ = ["MAX_JOB_ID", "MAX_PAGE_SIZE", "MAX_REQUEST_ID", "MAX_TIMEOUT_S", "ScanJobs"]

MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID = 128
MAX_JOB_ID = 64
MAX_TIMEOUT_S = 7 * 24 * 3600


class ScanJobs:
    """The service's operations over a job queue, a catalog and the allowed roots.

    Every method raises :class:`server.errors.ScanJobsError` subclasses for bad input and
    refused requests (see each one), and nothing transport-specific.
    """

    def __init__(self, queue: JobQueue, catalog: Catalog, roots: RootPolicy) -> None:
        self.queue = queue
        self.catalog = catalog
        self.roots = roots

    async def submit_scan(
        self,
        path: str,
        *,
        recursive: bool = True,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Job:
        """Check a scan request and queue it; returns the job once it is committed.

        Args:
            path: absolute directory inside the roots.
            recursive: descend into subdirectories.
            timeout_s: run-time limit in seconds; None or 0 means the server's default.
            request_id: idempotency key (at most :data:`MAX_REQUEST_ID` characters).

        Raises:
            InvalidArgument: a malformed path, timeout or request id.
            PermissionDenied, NotFound, FailedPrecondition: see :meth:`RootPolicy.check`.
            AlreadyExists, ResourceExhausted, ShuttingDown: see the queue's ``submit``.
        """
        spec = scan_spec(path, recursive=recursive, timeout_s=timeout_s, request_id=request_id)
        checked = await asyncio.to_thread(self.roots.check, spec.path)  # touches the disk
        return await self.queue.submit(
            JobSpec(checked, spec.recursive, spec.timeout_s, spec.request_id)
        )

    async def get_job(self, job_id: str) -> Job:
        """A job's current snapshot.

        Raises:
            InvalidArgument: a missing or over-long id.
            NotFound: no such job.
        """
        return await self.queue.get(checked_job_id(job_id))

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a job; see the queue's ``cancel``.

        Raises:
            InvalidArgument, NotFound, FailedPrecondition.
        """
        return await self.queue.cancel(checked_job_id(job_id))

    async def list_jobs(
        self, *, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """A page of jobs, newest first; ``page_size`` 0 means 50.

        Raises:
            InvalidArgument: a negative page size or a foreign page token.
        """
        size = checked_page_size(page_size, default=50)
        return await self.queue.list_jobs(state=state, page_size=size, page_token=page_token)

    async def watch_job(self, job_id: str, after_sequence: int = 0) -> Subscription:
        """Follow a job's events; see the queue's ``watch``.

        Raises:
            InvalidArgument, NotFound, ResourceExhausted, Unavailable.
        """
        return await self.queue.watch(checked_job_id(job_id), after_sequence)

    async def list_videos(
        self, *, path_prefix: str, job_id: str, page_size: int, page_token: str
    ) -> VideoPage:
        """A page of catalogued videos in path order; ``page_size`` 0 means 100.

        Raises:
            InvalidArgument: a negative page size or a foreign page token.
        """
        size = checked_page_size(page_size, default=100)
        return await self.catalog.list_videos(
            path_prefix=os.fsencode(path_prefix),
            job_id=job_id,
            page_size=size,
            page_token=page_token,
        )


def scan_spec(path: str, *, recursive: bool, timeout_s: float | None, request_id: str) -> JobSpec:
    """A scan request checked for form only (no file-system access).

    Raises:
        InvalidArgument: a malformed path, a timeout outside 0..:data:`MAX_TIMEOUT_S`
            seconds, or an over-long request id.
    """
    normalised = RootPolicy.check_syntax(path)
    if timeout_s is not None and (timeout_s < 0 or timeout_s > MAX_TIMEOUT_S):
        raise InvalidArgument(
            f"timeout must be between 0 and {MAX_TIMEOUT_S} seconds", field="timeout"
        )
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id"
        )
    return JobSpec(normalised, recursive, timeout_s or None, request_id)


def checked_job_id(raw: str) -> str:
    """A job id as given, once checked for form.

    Raises:
        InvalidArgument: empty, or longer than :data:`MAX_JOB_ID` characters.
    """
    if not raw:
        raise InvalidArgument("job_id is required", field="job_id")
    if len(raw) > MAX_JOB_ID:
        raise InvalidArgument(f"job_id is longer than {MAX_JOB_ID} characters", field="job_id")
    return raw


def checked_page_size(raw: int, *, default: int) -> int:
    """A page size: ``default`` for 0, capped at :data:`MAX_PAGE_SIZE`.

    Raises:
        InvalidArgument: negative.
    """
    if raw < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(raw or default, MAX_PAGE_SIZE)
