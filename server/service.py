"""The ScanService servicer: proto <-> domain conversion and status codes, nothing else.

This is the only module that knows gRPC status codes. Expected errors (``ScanJobsError``)
become their status with ``google.rpc.ErrorInfo`` (and ``BadRequest`` for bad input) in the
``grpc-status-details-bin`` trailer; anything else becomes INTERNAL with the text
``internal error`` and a logged traceback, never the exception's text.
"""

from __future__ import annotations

import asyncio
import collections
import logging
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

from . import errors, intake
from .auth import BearerTokens
from .catalog import Catalog, Failure, Video
from .jobs import Job, JobEvent, JobSpec, JobState, Phase, Trigger, display_path
from .library_watch import RootState
from .live_service import LiveLibrary
from .queue import JobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy

__all__ = [
    "ERROR_DOMAIN",
    "ScanService",
    "ServiceInterceptor",
    "code_of",
    "event_to_proto",
    "failure_to_proto",
    "job_to_proto",
    "spec_of",
    "state_of",
    "video_to_proto",
]

log = logging.getLogger(__name__)

ERROR_DOMAIN = "scanjobs"

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
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StorageIOError: grpc.StatusCode.UNAVAILABLE,
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
_HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_Context = grpc.aio.ServicerContext[Any, Any]


def code_of(exc: errors.ScanJobsError) -> grpc.StatusCode:
    """The status code of an expected error: the one map that every transport derives from."""
    return _CODES.get(type(exc)) or next(c for cls, c in _CODES.items() if isinstance(exc, cls))


def status_of(exc: errors.ScanJobsError) -> grpc.Status:
    """The rich gRPC status for an expected error."""
    code = code_of(exc)
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

    Health ``Watch`` streams need no token, so their number is capped here
    (``max_health_watchers``): past it a new one is RESOURCE_EXHAUSTED.

    Args:
        tokens: bearer tokens, any of which admits a call; none means no authentication.
        on_call: called with the method and status code name of every call (metrics).
        max_health_watchers: open health ``Watch`` streams allowed at once.
    """

    def __init__(
        self,
        tokens: frozenset[str] = frozenset(),
        on_call: Callable[[str, str], None] | None = None,
        max_health_watchers: int = 100,
    ) -> None:
        self._on_call = on_call
        self._max_health_watchers = max_health_watchers
        self._health_watchers = 0
        self._tokens = BearerTokens(tokens)
        self._in_flight = 0
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._refusing = False

    def refuse_new_calls(self) -> None:
        """From now on answer every new ScanService call UNAVAILABLE (``SHUTTING_DOWN``), so
        that clients retry elsewhere; calls already in flight go on."""
        self._refusing = True

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
        if handler is None:
            return handler
        if method == _HEALTH_WATCH and handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._capped(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif method.startswith(_METHOD_PREFIX):
            wrapped = self._wrap(method.removeprefix(_METHOD_PREFIX), handler)
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _capped(self, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
        """Health ``Watch`` with a cap on the streams open at once (they need no token)."""

        async def capped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._health_watchers >= self._max_health_watchers:
                status = status_of(
                    errors.ResourceExhausted(
                        f"too many health watchers (limit {self._max_health_watchers})",
                        reason="TOO_MANY_WATCHERS",
                    )
                )
                await context.abort(status.code, status.details, status.trailing_metadata)
            self._health_watchers += 1
            try:
                return await behavior(request, context)
            finally:
                self._health_watchers -= 1

        return capped

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
            admitted = False  # a stranger's request fields are not worth a line in our logs
            try:
                status = None
                try:
                    self._authenticate(context)
                    admitted = True
                    if self._refusing:
                        raise errors.ShuttingDown("the server is shutting down; retry elsewhere")
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
                _log_call(name, code, time.perf_counter() - started, request if admitted else None)
                if self._on_call is not None:
                    self._on_call(name, code.name)

        return guarded

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Admit the call if it carries one of the tokens."""
        if not self._tokens.required:
            return
        presented = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                presented = value
        self._tokens.check(presented)


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
    """One line per call; ``request`` (None before authentication) adds its ``job_id``."""
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
        checks: RootChecks,
        max_video_watchers: int = 4000,
        root_states: Callable[[], Awaitable[list[RootState]]] | None = None,
    ) -> None:
        super().__init__(catalog, roots, max_video_watchers, root_states)
        self._checks = checks
        self._queue = queue
        self._catalog = catalog
        self._roots = roots
        self._events: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        # The wire form of recent job snapshots, by identity: snapshots are immutable, and a
        # busy job is asked for the same snapshot many times between two changes.
        self._jobs: collections.OrderedDict[int, tuple[Job, pb.Job]] = collections.OrderedDict()

    async def SubmitScan(self, request: pb.SubmitScanRequest, context: _Context) -> pb.Job:
        job = await intake.submit_scan(
            self._queue, self._checks, spec_of(request), time_left_s=context.time_remaining()
        )
        return job_to_proto(job)

    async def GetJob(self, request: pb.GetJobRequest, context: _Context) -> pb.Job:
        return self._job_proto(await self._queue.get(intake.job_id(request.job_id)))

    async def CancelJob(self, request: pb.CancelJobRequest, context: _Context) -> pb.Job:
        return job_to_proto(await self._queue.cancel(intake.job_id(request.job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: _Context) -> pb.ListJobsResponse:
        jobs, token = await intake.list_jobs(
            self._queue, self._roots, state=state_of(request.state),
            page_size=intake.page_size(request.page_size, default=50),
            page_token=request.page_token,
        )  # fmt: skip
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    async def ListVideos(
        self, request: pb.ListVideosRequest, context: _Context
    ) -> pb.ListVideosResponse:
        videos, token, sequence = await intake.list_videos(
            self._catalog, self._roots, path_prefix=request.path_prefix, job_id=request.job_id,
            page_size=intake.page_size(request.page_size, default=100),
            page_token=request.page_token, include_missing=request.include_missing,
        )  # fmt: skip
        return pb.ListVideosResponse(
            videos=[video_to_proto(v) for v in videos],
            next_page_token=token,
            catalog_sequence=sequence,
        )

    async def ListFileErrors(
        self, request: pb.ListFileErrorsRequest, context: _Context
    ) -> pb.ListFileErrorsResponse:
        failures, token = await intake.list_file_errors(
            self._catalog, self._roots, path_prefix=request.path_prefix,
            page_size=intake.page_size(request.page_size, default=100),
            page_token=request.page_token,
        )  # fmt: skip
        return pb.ListFileErrorsResponse(
            file_errors=[failure_to_proto(f) for f in failures], next_page_token=token
        )

    async def WatchJob(  # type: ignore[override]
        self, request: pb.WatchJobRequest, context: _Context
    ) -> None:
        # A coroutine around context.write, not an async generator: its cleanup must run when
        # the client hangs up (CancelledError here), not whenever the generator is collected.
        subscription = await self._queue.watch(
            intake.job_id(request.job_id), request.after_sequence
        )
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
            message = event_to_proto(event, self._job_proto(event.job))
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


def spec_of(request: pb.SubmitScanRequest) -> JobSpec:
    """The checked job spec of a SubmitScan request (see ``intake.job_spec``)."""
    timeout_s = None
    if request.HasField("timeout"):
        timeout_s = request.timeout.ToTimedelta().total_seconds()
    return intake.job_spec(
        request.path,
        recursive=request.recursive if request.HasField("recursive") else True,
        timeout_s=timeout_s,
        request_id=request.request_id,
        reprobe=request.reprobe,
    )


def state_of(value: int) -> JobState | None:
    """The job state a ListJobs filter names; ``None`` for JOB_STATE_UNSPECIFIED (any state).

    Raises:
        InvalidArgument: not a known state.
    """
    if value not in _PB_TO_STATE and value != pb.JOB_STATE_UNSPECIFIED:
        raise errors.InvalidArgument(f"unknown state {value}", field="state")
    return _PB_TO_STATE.get(value)  # type: ignore[call-overload,no-any-return]


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


def event_to_proto(event: JobEvent, job: pb.Job | None = None) -> pb.JobEvent:
    """The wire form of a job event; ``job`` is its snapshot when already converted."""
    return pb.JobEvent(
        sequence=event.sequence,
        job=job if job is not None else job_to_proto(event.job),
        event_time=_timestamp(event.time),
    )


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
