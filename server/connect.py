"""ScanService over Connect and gRPC-Web: the HTTP port's twin of ``service.ScanService``.

Like the gRPC servicer it only converts and maps: requests go through ``intake`` to the same
queue and catalog, replies are converted by ``service``'s converters, and an expected error
becomes the Connect code of its gRPC status (``service.code_of``, the one map) with its
``google.rpc.ErrorInfo`` reason attached. Anything unexpected is ``internal`` with the text
``internal error``: by default the Connect runtime would send the exception's text.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.rpc import error_details_pb2
from protobuf.wkt import Any as AnyDetail

from scanjobs.v1 import scanjobs_pb2 as pb

from . import errors, intake
from .auth import BearerTokens
from .catalog import Catalog
from .library_watch import RootState
from .live_service import StreamSlots, changes_of, roots_reply
from .queue import JobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy
from .service import (
    ERROR_DOMAIN,
    code_of,
    event_to_proto,
    failure_to_proto,
    job_to_proto,
    spec_of,
    state_of,
    video_to_proto,
)

__all__ = ["ConnectScanService", "connect_error"]

log = logging.getLogger(__name__)

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Context = RequestContext[Any, Any]
_Handler = Callable[[Any, _Request, _Context], Coroutine[Any, Any, _Reply]]
_ERROR_INFO_URL = "type.googleapis.com/google.rpc.ErrorInfo"


def connect_error(exc: errors.ScanJobsError) -> ConnectError:
    """The Connect error for an expected error: same code as on the gRPC port, same reason."""
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN)
    detail = AnyDetail(type_url=_ERROR_INFO_URL, value=info.SerializeToString())
    return ConnectError(_connect_code(code_of(exc)), exc.message, [detail])


def _connect_code(code: grpc.StatusCode) -> Code:
    # Connect's codes are gRPC's, spelt in lower case (and CANCELLED as "canceled").
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code[code.name]


def _unary(
    name: str,
) -> Callable[[_Handler[_Request, _Reply]], _Handler[_Request, _Reply]]:
    """Authenticate, map errors, count and log one unary call of ``name``."""

    def decorate(handler: _Handler[_Request, _Reply]) -> _Handler[_Request, _Reply]:
        async def call(self: ConnectScanService, request: _Request, ctx: _Context) -> _Reply:
            started = time.perf_counter()
            code = "CANCELLED"  # unless we learn better: the client went away
            try:
                self.authenticate(ctx)
                reply = await handler(self, request, ctx)
                code = "OK"
                return reply
            except errors.ScanJobsError as exc:
                code = code_of(exc).name
                raise connect_error(exc) from None
            except Exception:
                log.exception("unexpected error in %s", name, extra={"method": name})
                code = "INTERNAL"
                raise ConnectError(Code.INTERNAL, "internal error") from None
            finally:
                self.record(name, code, started, getattr(request, "job_id", ""))

        return call

    return decorate


class ConnectScanService:
    """Maps ScanService calls over Connect and gRPC-Web onto the job queue and the catalog.

    Args:
        queue, catalog, roots: the same core objects the gRPC servicer uses.
        tokens: bearer tokens, one of which every call must carry when any is configured.
        on_call: called with the method and status code name of every call (metrics).
        root_states: each root's watch state, or None without ``--watch``.
        video_slots: the WatchVideos streams open on both ports and their limit (the gRPC
            servicer's ``video_slots``); one of its own with the default limit if None.
    """

    def __init__(
        self,
        queue: JobQueue,
        catalog: Catalog,
        roots: RootPolicy,
        tokens: BearerTokens,
        checks: RootChecks,
        on_call: Callable[[str, str], None] | None = None,
        root_states: Callable[[], Awaitable[list[RootState]]] | None = None,
        video_slots: StreamSlots | None = None,
    ) -> None:
        self._queue = queue
        self._catalog = catalog
        self._roots = roots
        self._tokens = tokens
        self._checks = checks
        self._on_call = on_call
        self._root_states = root_states
        self._video_slots = video_slots if video_slots is not None else StreamSlots(4000)

    def authenticate(self, ctx: _Context) -> None:
        """Admit a call that carries one of the tokens in its ``authorization`` header."""
        self._tokens.check(ctx.request_headers.get("authorization"))

    def record(self, name: str, code: str, started: float, job_id: str = "") -> None:
        """One log line and one metric per call (``started``: ``time.perf_counter()``)."""
        if self._on_call is not None:
            self._on_call(name, code)
        if log.isEnabledFor(logging.INFO):
            fields: dict[str, object] = {
                "method": name,
                "code": code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "transport": "http",
            }
            if job_id:
                fields["job_id"] = job_id
            log.info("rpc", extra=fields)

    @_unary("SubmitScan")
    async def submit_scan(self, request: pb.SubmitScanRequest, ctx: _Context) -> pb.Job:
        left_ms = ctx.timeout_ms
        job = await intake.submit_scan(
            self._queue, self._checks, spec_of(request),
            time_left_s=None if left_ms is None else left_ms / 1000,
        )  # fmt: skip
        return job_to_proto(job)

    @_unary("GetJob")
    async def get_job(self, request: pb.GetJobRequest, ctx: _Context) -> pb.Job:
        return job_to_proto(await self._queue.get(intake.job_id(request.job_id)))

    @_unary("CancelJob")
    async def cancel_job(self, request: pb.CancelJobRequest, ctx: _Context) -> pb.Job:
        return job_to_proto(await self._queue.cancel(intake.job_id(request.job_id)))

    @_unary("ListJobs")
    async def list_jobs(self, request: pb.ListJobsRequest, ctx: _Context) -> pb.ListJobsResponse:
        jobs, token = await intake.list_jobs(
            self._queue, self._roots, state=state_of(request.state),
            page_size=intake.page_size(request.page_size, default=50),
            page_token=request.page_token,
        )  # fmt: skip
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    @_unary("ListVideos")
    async def list_videos(
        self, request: pb.ListVideosRequest, ctx: _Context
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

    @_unary("ListFileErrors")
    async def list_file_errors(
        self, request: pb.ListFileErrorsRequest, ctx: _Context
    ) -> pb.ListFileErrorsResponse:
        failures, token = await intake.list_file_errors(
            self._catalog, self._roots, path_prefix=request.path_prefix,
            page_size=intake.page_size(request.page_size, default=100),
            page_token=request.page_token,
        )  # fmt: skip
        return pb.ListFileErrorsResponse(
            file_errors=[failure_to_proto(f) for f in failures], next_page_token=token
        )

    @_unary("ListRoots")
    async def list_roots(self, request: pb.ListRootsRequest, ctx: _Context) -> pb.ListRootsResponse:
        return await roots_reply(self._catalog, self._roots, self._root_states)

    async def watch_videos(
        self, request: pb.WatchVideosRequest, ctx: _Context
    ) -> AsyncIterator[pb.VideoEvent]:
        """Stream the catalog's changes, as the gRPC WatchVideos does."""
        started = time.perf_counter()
        code = "CANCELLED"
        try:
            self.authenticate(ctx)
            with self._video_slots.hold():
                changes = changes_of(self._catalog, self._roots, request)
                async with contextlib.aclosing(changes):
                    async for event in changes:
                        yield event
            code = "OK"
        except errors.ScanJobsError as exc:
            code = code_of(exc).name
            raise connect_error(exc) from None
        finally:
            self.record("WatchVideos", code, started)

    async def watch_job(
        self, request: pb.WatchJobRequest, ctx: _Context
    ) -> AsyncIterator[pb.JobEvent]:
        """Stream a job's events; the runtime closes this generator as soon as the client
        hangs up, so the subscription is released at once."""
        started = time.perf_counter()
        code = "CANCELLED"
        try:
            self.authenticate(ctx)
            subscription = await self._queue.watch(
                intake.job_id(request.job_id), request.after_sequence
            )
            try:
                async for event in subscription:
                    yield event_to_proto(event)
            finally:
                subscription.close()
            code = "OK"
        except errors.ScanJobsError as exc:
            code = code_of(exc).name
            raise connect_error(exc) from None
        except Exception:
            log.exception("unexpected error in WatchJob", extra={"method": "WatchJob"})
            code = "INTERNAL"
            raise ConnectError(Code.INTERNAL, "internal error") from None
        finally:
            self.record("WatchJob", code, started, request.job_id)
