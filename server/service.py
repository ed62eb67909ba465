"""The ScanService servicer: proto <-> domain conversion and status codes, nothing else.

This is the only module that knows gRPC status codes. Expected errors (``ScanJobsError``)
become their status with ``google.rpc.ErrorInfo`` (and ``BadRequest`` for bad input) in the
``grpc-status-details-bin`` trailer; anything else becomes INTERNAL with the text
``internal error`` and a logged traceback, never the exception's text.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc

from . import errors
from .catalog import Catalog, Failure, Video
from .jobs import Job, JobEvent, JobSpec, JobState, Phase, Trigger, display_path
from .live_service import LiveLibrary
from .queue import JobQueue
from .roots import RootPolicy, jobs_within_roots
from .watch import RootState

__all__ = ["ERROR_DOMAIN", "ScanService", "ServiceInterceptor", "job_to_proto", "video_to_proto"]

log = logging.getLogger(__name__)

ERROR_DOMAIN = "scanjobs"
MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID = 128
_MAX_TIMEOUT_S = 7 * 24 * 3600

_CODES: dict[type[errors.ScanJobsError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_STATE_TO_PB = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.COMPLETED: pb.JOB_STATE_COMPLETED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.TIMEOUT: pb.JOB_STATE_TIMEOUT,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}
_TRIGGER_TO_PB = {
    Trigger.API: pb.JOB_TRIGGER_API,
    Trigger.WATCH: pb.JOB_TRIGGER_WATCH,
    Trigger.SCHEDULE: pb.JOB_TRIGGER_SCHEDULE,
}
_PHASE_TO_PB = {
    Phase.UNSPECIFIED: pb.SCAN_PHASE_UNSPECIFIED,
    Phase.DISCOVERING: pb.SCAN_PHASE_DISCOVERING,
    Phase.PROBING: pb.SCAN_PHASE_PROBING,
}

_METHOD_PREFIX = "/scanjobs.v1.ScanService/"
_Context = grpc.aio.ServicerContext[Any, Any]


def status_of(exc: errors.ScanJobsError) -> grpc.Status:
    """The rich gRPC status for an expected error."""
    code = _CODES.get(type(exc)) or next(c for cls, c in _CODES.items() if isinstance(exc, cls))
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))
    details = [info]
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=details)
    return rpc_status.to_status(status)


def _internal_status() -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    return rpc_status.to_status(status)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every ScanService call: authentication, status mapping, one log line, and
    in-flight accounting.

    This is the one place where expected errors become status codes and bugs become a bare
    INTERNAL. Health and reflection stay open and keep their own behaviour.

    Args:
        tokens: bearer tokens, any of which admits a call; none means no authentication.
        on_call: called with the method and status code name of every call (metrics).
    """

    def __init__(
        self,
        tokens: frozenset[str] = frozenset(),
        on_call: Callable[[str, str], None] | None = None,
    ) -> None:
        self._on_call = on_call
        self._tokens = [hashlib.sha256(t.encode()).digest() for t in sorted(tokens)]
        self._in_flight = 0
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no ScanService call is in flight; False if ``timeout_s`` ran out."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:  # the same wrapper serves every call of a method
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(_METHOD_PREFIX):
            return handler
        wrapped = self._wrap(method.removeprefix(_METHOD_PREFIX), handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self, name: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        parse = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guarded(name, handler.unary_unary),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guarded(name, handler.unary_stream),
                request_deserializer=parse,
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        return handler  # pragma: no cover - ScanService has no client-streaming methods

    def _guarded(
        self, name: str, behavior: Callable[[Any, Any], Any]
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._in_flight += 1
            self._idle.clear()
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless we learn better: the client went away
            try:
                status = None
                try:
                    self._authenticate(context)
                    if isinstance(request, _Malformed):
                        raise errors.InvalidArgument(request.message, reason="MALFORMED_REQUEST")
                    result = await behavior(request, context)
                    code = grpc.StatusCode.OK
                    return result
                except errors.ScanJobsError as exc:
                    status = status_of(exc)
                except Exception:
                    log.exception("unexpected error in %s", name, extra={"method": name})
                    status = _internal_status()
                code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
                _log_call(name, code, time.perf_counter() - started, request)
                if self._on_call is not None:
                    self._on_call(name, code.name)

        return guarded

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Admit the call if it carries one of the tokens, compared in constant time."""
        if not self._tokens:
            return
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                presented = value.removeprefix("Bearer ").encode()
        digest = hashlib.sha256(presented).digest()
        match = False
        for token in self._tokens:  # no early exit: the time does not depend on which matched
            match |= hmac.compare_digest(digest, token)
        if not presented or not match:
            raise errors.Unauthenticated(
                "missing or invalid bearer token (send 'authorization: Bearer <token>')",
                reason="UNAUTHENTICATED",
            )


@dataclass(frozen=True, slots=True)
class _Malformed:
    """A request whose bytes did not parse; answered INVALID_ARGUMENT, not UNKNOWN."""

    message: str


def _lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def lenient(data: bytes) -> Any:
        try:
            return parse(data) if parse is not None else data
        except DecodeError as exc:
            return _Malformed(f"the request could not be parsed: {exc}")

    return lenient


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A serializer that lets already serialised messages through, so that one event is
    serialised once for all of its watchers."""

    def serializer(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return serialize(message) if serialize is not None else message

    return serializer


def _log_call(name: str, code: grpc.StatusCode, elapsed_s: float, request: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, object] = {
        "method": name,
        "code": code.name,
        "duration_ms": round(elapsed_s * 1000, 2),
    }
    job_id = getattr(request, "job_id", "")
    if job_id:
        fields["job_id"] = job_id
    log.info("rpc", extra=fields)


class ScanService(LiveLibrary, pb_grpc.ScanServiceServicer):  # type: ignore[misc]
    """Maps ScanService RPCs onto the job queue and the catalog."""

    def __init__(
        self,
        queue: JobQueue,
        catalog: Catalog,
        roots: RootPolicy,
        *,
        max_video_watchers: int = 4000,
        root_states: Callable[[], list[RootState]] | None = None,
    ) -> None:
        super().__init__(catalog, roots, max_video_watchers, root_states)
        self._queue = queue
        self._catalog = catalog
        self._roots = roots
        self._events: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        # The wire form of recent job snapshots, by identity: snapshots are immutable, and a
        # busy job is asked for the same snapshot many times between two changes.
        self._jobs: collections.OrderedDict[int, tuple[Job, pb.Job]] = collections.OrderedDict()

    async def SubmitScan(self, request: pb.SubmitScanRequest, context: _Context) -> pb.Job:
        spec = _spec_of(request)
        path = await asyncio.to_thread(self._roots.check, spec.path)
        job = await self._queue.submit(
            JobSpec(path, spec.recursive, spec.timeout_s, spec.request_id, spec.reprobe)
        )
        return job_to_proto(job)

    async def GetJob(self, request: pb.GetJobRequest, context: _Context) -> pb.Job:
        return self._job_proto(await self._queue.get(_job_id(request.job_id)))

    async def CancelJob(self, request: pb.CancelJobRequest, context: _Context) -> pb.Job:
        return job_to_proto(await self._queue.cancel(_job_id(request.job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: _Context) -> pb.ListJobsResponse:
        page_size = _page_size(request.page_size, default=50)
        if request.state not in _PB_TO_STATE and request.state != pb.JOB_STATE_UNSPECIFIED:
            raise errors.InvalidArgument(f"unknown state {request.state}", field="state")
        state = _PB_TO_STATE.get(request.state)
        jobs, token = await jobs_within_roots(
            self._queue, self._roots, state=state, page_size=page_size,
            page_token=request.page_token,
        )  # fmt: skip
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    async def ListVideos(
        self, request: pb.ListVideosRequest, context: _Context
    ) -> pb.ListVideosResponse:
        page_size = _page_size(request.page_size, default=100)
        videos, token, sequence = await self._catalog.catalog_listing(
            path_prefix=os.fsencode(request.path_prefix),
            job_id=request.job_id,
            page_size=page_size,
            page_token=request.page_token,
            include_missing=request.include_missing,
            roots=self._roots.listed(),
        )
        return pb.ListVideosResponse(
            videos=[video_to_proto(v) for v in videos],
            next_page_token=token,
            catalog_sequence=sequence,
        )

    async def ListFileErrors(
        self, request: pb.ListFileErrorsRequest, context: _Context
    ) -> pb.ListFileErrorsResponse:
        failures, token = await self._catalog.list_failures(
            path_prefix=os.fsencode(request.path_prefix),
            page_size=_page_size(request.page_size, default=100),
            page_token=request.page_token,
            roots=self._roots.listed(),
        )
        return pb.ListFileErrorsResponse(
            file_errors=[failure_to_proto(f) for f in failures], next_page_token=token
        )

    async def WatchJob(  # type: ignore[override]
        self, request: pb.WatchJobRequest, context: _Context
    ) -> None:
        # A coroutine around context.write, not an async generator: its cleanup must run when
        # the client hangs up (CancelledError here), not whenever the generator is collected.
        subscription = await self._queue.watch(_job_id(request.job_id), request.after_sequence)
        try:
            async for event in subscription:
                # Bytes pass the stream's serializer untouched (see ServiceInterceptor).
                await context.write(self._event_bytes(event))
        finally:
            subscription.close()

    def _event_bytes(self, event: JobEvent) -> bytes:
        """Convert and serialise an event once, however many watchers send it."""
        key = (event.job.id, event.sequence)
        data = self._events.get(key)
        if data is None:
            message = pb.JobEvent(
                sequence=event.sequence,
                job=self._job_proto(event.job),
                event_time=_timestamp(event.time),
            )
            data = self._events[key] = message.SerializeToString()
            if len(self._events) > 256:
                self._events.popitem(last=False)
        return data

    def _job_proto(self, job: Job) -> pb.Job:
        cached = self._jobs.get(id(job))
        if cached is not None and cached[0] is job:
            return cached[1]
        message = job_to_proto(job)
        self._jobs[id(job)] = (job, message)  # holding the job keeps its id from being reused
        if len(self._jobs) > 256:
            self._jobs.popitem(last=False)
        return message


def _job_id(raw: str) -> str:
    if not raw:
        raise errors.InvalidArgument("job_id is required", field="job_id")
    if len(raw) > 64:
        raise errors.InvalidArgument("job_id is longer than 64 characters", field="job_id")
    return raw


def _page_size(raw: int, *, default: int) -> int:
    if raw < 0:
        raise errors.InvalidArgument("page_size must not be negative", field="page_size")
    return min(raw or default, MAX_PAGE_SIZE)


def _spec_of(request: pb.SubmitScanRequest) -> JobSpec:
    path = RootPolicy.check_syntax(request.path)
    timeout_s: float | None = None
    if request.HasField("timeout"):
        timeout_s = request.timeout.ToTimedelta().total_seconds()
        if timeout_s < 0 or timeout_s > _MAX_TIMEOUT_S:
            raise errors.InvalidArgument(
                f"timeout must be between 0 and {_MAX_TIMEOUT_S} seconds", field="timeout"
            )
    if len(request.request_id) > MAX_REQUEST_ID:
        raise errors.InvalidArgument(
            f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id"
        )
    recursive = request.recursive if request.HasField("recursive") else True
    return JobSpec(path, recursive, timeout_s or None, request.request_id, request.reprobe)


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _ns_timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def job_to_proto(job: Job) -> pb.Job:
    """The wire form of a job snapshot."""
    progress, result = job.progress, job.result
    return pb.Job(
        id=job.id,
        state=_STATE_TO_PB[job.state],
        path=job.spec.path,
        recursive=job.spec.recursive,
        trigger=_TRIGGER_TO_PB[job.spec.trigger],
        cancel_requested=job.cancel_requested,
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        progress=pb.JobProgress(
            phase=_PHASE_TO_PB[progress.phase],
            files_found=progress.files_found,
            files_done=progress.files_done,
            fraction=progress.fraction,
            current_path=progress.current_path,
        ),
        result=pb.ScanResult(
            scanned=result.scanned,
            added=result.added,
            updated=result.updated,
            unchanged=result.unchanged,
            failed=result.failed,
            errors=[pb.FileError(path=e.path, message=e.message) for e in result.errors],
            error_count=result.error_count,
            removed=result.removed,
            moved=result.moved,
            restored=result.restored,
        ),
        error=job.error,
        timeout=_seconds(job.timeout_s),
        request_id=job.spec.request_id,
        attempts=job.attempts,
        reprobe=job.spec.reprobe,
    )


def video_to_proto(video: Video) -> pb.Video:
    """The wire form of a catalogued video."""
    info = video.info
    rate = info.frame_rate
    return pb.Video(
        path=display_path(video.path),
        size_bytes=video.stamp.size_bytes,
        mtime=_ns_timestamp(video.stamp.mtime_ns),
        duration=_seconds(info.duration_s) if info.duration_s is not None else None,
        frame_rate_numerator=rate.numerator if rate else 0,
        frame_rate_denominator=rate.denominator if rate else 0,
        width=info.width,
        height=info.height,
        video_codec=info.video_codec,
        audio_codec=info.audio_codec,
        audio_streams=info.audio_streams,
        subtitle_streams=info.subtitle_streams,
        data_streams=info.data_streams,
        container=info.container,
        bit_rate=info.bit_rate,
        first_seen_time=_ns_timestamp(video.first_seen_ns),
        last_seen_time=_ns_timestamp(video.last_seen_ns),
        job_id=video.job_id,
        missing_time=_ns_timestamp(video.missing_ns) if video.missing_ns is not None else None,
    )


def failure_to_proto(failure: Failure) -> pb.FileError:
    """The wire form of a remembered failure."""
    return pb.FileError(
        path=display_path(failure.path),
        message=failure.message,
        size_bytes=failure.stamp.size_bytes,
        mtime=_ns_timestamp(failure.stamp.mtime_ns),
        job_id=failure.job_id,
        error_time=_ns_timestamp(failure.time_ns),
    )
