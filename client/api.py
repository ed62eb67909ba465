"""A small typed async client for ScanService.

Example::

    async with ScanClient("127.0.0.1:50051") as client:
        job = await client.submit("/srv/media")
        async for event in client.watch(job.id):
            print(event.job.progress.files_done)

Every unary call has a deadline; ``watch`` reconnects and resumes with ``after_sequence`` when
the stream breaks with UNAVAILABLE (a restart, a drain, a dropped connection), a bounded
number of times with exponential backoff. Failed calls raise :mod:`client.errors` exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc

from .errors import ScanClientError, ServiceUnavailable, from_rpc_error

__all__ = ["TERMINAL_STATES", "ScanClient", "ScanClientError", "TlsFiles", "is_terminal"]

TERMINAL_STATES = frozenset(
    {pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_TIMEOUT, pb.JOB_STATE_CANCELLED}
)
_T = TypeVar("_T")
_KEEPALIVE = [
    # Notice a vanished server during a quiet watch in seconds, not at the TCP timeout.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS: ``ca`` verifies the server; ``cert`` + ``key`` authenticate us (mTLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


class ScanClient:
    """A connection to one scanjobs server.

    Args:
        target: ``host:port`` (or any gRPC target, e.g. ``dns:///scanjobs:50051``).
        token: bearer token sent as ``authorization`` metadata on every call.
        tls: TLS files; plaintext when None.
        timeout_s: deadline of every unary call.
        reconnects: how many times in a row ``watch`` reconnects before giving up.
        backoff_s: first reconnect delay; doubles each time, capped at 5 s.
        balance: spread calls over every address the target resolves to (gRPC's
            round-robin balancer), for several replicas behind one DNS name.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TlsFiles | None = None,
        timeout_s: float = 10.0,
        reconnects: int = 8,
        backoff_s: float = 0.1,
        balance: bool = False,
    ) -> None:
        options = [*_KEEPALIVE, *([("grpc.lb_policy_name", "round_robin")] if balance else [])]
        if tls is not None:
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.ScanServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s
        self._reconnects = reconnects
        self._backoff_s = backoff_s

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _unary(self, call: Callable[..., Awaitable[_T]], request: object) -> _T:
        try:
            return await call(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def submit(
        self,
        path: str,
        *,
        recursive: bool = True,
        timeout_s: float | None = None,
        request_id: str = "",
        reprobe: bool = False,
    ) -> pb.Job:
        """Start a scan of the absolute directory ``path``; returns the new job.

        Args:
            path: absolute directory on the server's file system.
            recursive: descend into subdirectories.
            timeout_s: the job's run-time limit; the server's default when None.
            request_id: makes retries of this call safe: the same id returns the same job.
            reprobe: probe every file again, even unchanged ones and remembered failures.
        """
        request = pb.SubmitScanRequest(
            path=path, recursive=recursive, request_id=request_id, reprobe=reprobe
        )
        if timeout_s is not None:
            request.timeout.FromNanoseconds(round(timeout_s * 1e9))
        return await self._unary(self._stub.SubmitScan, request)

    async def get(self, job_id: str) -> pb.Job:
        """One job's current snapshot."""
        return await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    async def cancel(self, job_id: str) -> pb.Job:
        """Ask a job to stop; returns it as it was when the cancel was accepted."""
        return await self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    async def list_jobs(
        self, *, state: int = pb.JOB_STATE_UNSPECIFIED, limit: int | None = None
    ) -> AsyncIterator[pb.Job]:
        """Jobs newest first, across pages; at most ``limit`` of them."""
        token, count = "", 0
        while True:
            request = pb.ListJobsRequest(page_size=min(limit or 200, 200), page_token=token)
            request.state = state  # type: ignore[assignment]
            page = await self._unary(self._stub.ListJobs, request)
            for job in page.jobs:
                yield job
                count += 1
                if limit is not None and count >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    async def list_videos(
        self, *, prefix: str = "", job_id: str = "", include_missing: bool = False
    ) -> AsyncIterator[pb.Video]:
        """The catalog ordered by path, across pages; missing videos only if asked."""
        token = ""
        while True:
            request = pb.ListVideosRequest(
                page_size=500, page_token=token, path_prefix=prefix, job_id=job_id,
                include_missing=include_missing,
            )  # fmt: skip
            page = await self._unary(self._stub.ListVideos, request)
            for video in page.videos:
                yield video
            token = page.next_page_token
            if not token:
                return

    async def list_file_errors(self, *, prefix: str = "") -> AsyncIterator[pb.FileError]:
        """Files that could not be probed, with their errors, ordered by path, across pages."""
        token = ""
        while True:
            request = pb.ListFileErrorsRequest(page_size=500, page_token=token, path_prefix=prefix)
            page = await self._unary(self._stub.ListFileErrors, request)
            for error in page.file_errors:
                yield error
            token = page.next_page_token
            if not token:
                return

    async def watch(self, job_id: str, *, after_sequence: int = 0) -> AsyncIterator[pb.JobEvent]:
        """A job's events until its terminal event, resuming across broken streams.

        Raises:
            ServiceUnavailable: the stream broke and ``reconnects`` attempts in a row failed.
            ScanClientError: any other failure (e.g. NotFound).
        """
        last, failures = after_sequence, 0
        while True:
            request = pb.WatchJobRequest(job_id=job_id, after_sequence=last)
            try:
                ended = False
                async for event in self._stub.WatchJob(request, metadata=self._metadata):
                    failures = 0
                    last = event.sequence
                    if not ended:
                        yield event
                    ended = ended or event.job.state in TERMINAL_STATES
                # The server ends the stream with OK right after the terminal event; reading
                # to that end (rather than hanging up) lets the call finish as OK on both sides.
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, ServiceUnavailable) or failures >= self._reconnects:
                    raise error from None
            failures += 1
            await asyncio.sleep(min(5.0, self._backoff_s * 2 ** (failures - 1)))

    async def list_roots(self) -> list[pb.Root]:
        """The server's roots and how each is watched."""
        reply = await self._unary(self._stub.ListRoots, pb.ListRootsRequest())
        return list(reply.roots)

    async def catalog_sequence(self) -> int:
        """The catalog's change sequence now: follow from it to see only what comes next."""
        reply = await self._unary(self._stub.ListVideos, pb.ListVideosRequest(page_size=1))
        return reply.catalog_sequence

    async def follow(
        self, *, prefix: str = "", after_sequence: int = 0
    ) -> AsyncIterator[pb.VideoEvent]:
        """The catalog's changes after ``after_sequence``, forever, resuming after the last
        one seen across broken streams and server restarts (retrying with backoff).

        Raises:
            ScanClientError: anything but UNAVAILABLE, e.g. OUT_OF_RANGE (reason
                HISTORY_EXPIRED): the changes after ``after_sequence`` are no longer kept.
        """
        last, failures = after_sequence, 0
        while True:
            request = pb.WatchVideosRequest(path_prefix=prefix, after_sequence=last)
            try:
                async for event in self._stub.WatchVideos(request, metadata=self._metadata):
                    failures = 0
                    last = event.sequence
                    yield event
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, ServiceUnavailable):
                    raise error from None
            failures += 1
            await asyncio.sleep(min(5.0, self._backoff_s * 2 ** (failures - 1)))


def is_terminal(job: pb.Job) -> bool:
    """True once the job reached a final state."""
    return job.state in TERMINAL_STATES
