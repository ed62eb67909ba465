"""The HTTP port's ASGI application: Connect and gRPC-Web, the REST paths, and the web page.

An adapter like ``service.py``: it routes, converts JSON to and from the proto's JSON mapping,
and maps errors; the work is done by the same core calls the gRPC servicer makes.

- ``/scanjobs.v1.ScanService/<Method>``: Connect (JSON and binary) and gRPC-Web, served by the
  ``connectrpc`` runtime over ``connect.ConnectScanService``.
- ``POST /api/v1/scans`` (201), ``GET /api/v1/jobs/{id}``, ``POST /api/v1/jobs/{id}/cancel``:
  JSON bodies; errors are ``{"code", "message", "reason"}`` with the HTTP status that fits.
- ``/`` and its files: the page, from ``server/static`` (built from ``web/``).

Cross-origin requests are refused unless their origin is listed (``--http-cors-origin``); a
token, when required, travels only in the ``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from scanjobs.v1 import scanjobs_pb2 as pb

from . import errors, intake
from .auth import BearerTokens
from .queue import JobQueue
from .rootcheck import RootChecks
from .roots import RootPolicy
from .service import code_of, job_to_proto, spec_of

__all__ = ["STATIC_DIR", "HttpApp"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

Scope = MutableMapping[str, Any]
Message_ = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message_]]
Send = Callable[[Message_], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CONNECT_PREFIX = "/scanjobs.v1.ScanService/"
_JOB_PATH = re.compile(r"^/api/v1/jobs/(?P<id>[^/]+)(?P<cancel>/cancel)?$")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page loads nothing from another origin and talks only to this one.
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        b"form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]
_CORS_ALLOW_HEADERS = (
    b"authorization, content-type, connect-protocol-version, connect-timeout-ms, "
    b"grpc-timeout, x-grpc-web, x-user-agent"
)
_CORS_EXPOSE_HEADERS = b"grpc-status, grpc-message, grpc-status-details-bin, location"


class HttpError(Exception):
    """A request refused by the HTTP layer itself, before any core call."""

    def __init__(self, status: HTTPStatus, code: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.reason = status, code, message, reason


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]


class HttpApp:
    """The ASGI application of ``--http-listen``.

    Args:
        connect: the Connect / gRPC-Web application for ScanService.
        queue, roots: the same core objects the gRPC servicer uses (for the REST paths).
        record: called with the method, status code name, start time and job id of every
            REST call (``ConnectScanService.record``: one log line and one metric per call).
        tokens: bearer tokens; the REST paths check them as the Connect service does.
        cors_origins: origins (``scheme://host[:port]``) whose pages may call this port.
        max_body_bytes: largest REST request body accepted (413 beyond).
        static_dir: the built page.
    """

    def __init__(
        self,
        connect: AsgiApp,
        queue: JobQueue,
        roots: RootPolicy,
        tokens: BearerTokens,
        record: Callable[[str, str, float, str], None],
        *,
        checks: RootChecks,
        cors_origins: Iterable[str] = (),
        max_body_bytes: int = 64 * 1024,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self._connect = connect
        self._queue = queue
        self._roots = roots
        self._tokens = tokens
        self._checks = checks
        self._record = record
        self._cors_origins = frozenset(cors_origins)
        self._max_body_bytes = max_body_bytes
        self._static = {
            "/" + p.relative_to(static_dir).as_posix(): p
            for p in (static_dir.rglob("*") if static_dir.is_dir() else ())
            if p.is_file() and p.suffix in _CONTENT_TYPES
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets: nothing to do
        request = _Request(scope["method"], scope["path"], _headers(scope))
        try:
            origin = self._cross_origin(scope, request)
            if origin and request.method == "OPTIONS":
                await _send_preflight(send, origin)
                return
            if origin:
                send = _with_cors(send, origin)
            await self._route(scope, receive, send, request)
        except HttpError as exc:
            await _send_error(send, exc.status, exc.code, exc.message, exc.reason)

    def _cross_origin(self, scope: Scope, request: _Request) -> str | None:
        """The origin of an allowed cross-origin request; None for a same-origin one.

        Raises:
            HttpError: 403 for a cross-origin request from an origin that is not listed.
        """
        origin = request.headers.get("origin")
        if origin is None or origin == _own_origin(scope, request):
            return None
        if origin not in self._cors_origins:
            raise HttpError(
                HTTPStatus.FORBIDDEN,
                "permission_denied",
                f"cross-origin requests from {origin} are not allowed",
                "ORIGIN_NOT_ALLOWED",
            )
        return origin

    async def _route(self, scope: Scope, receive: Receive, send: Send, request: _Request) -> None:
        path = request.path
        if path.startswith(_CONNECT_PREFIX):
            _refuse_native_grpc(request)
            await self._connect(scope, receive, send)
        elif path == "/api/v1/scans":
            _allow(request, "POST")
            await self._submit(receive, send, request)
        elif match := _JOB_PATH.match(path):
            _allow(request, "POST" if match["cancel"] else "GET")
            await self._job(send, request, match["id"], cancel=bool(match["cancel"]))
        else:
            await self._page(send, request)

    async def _submit(self, receive: Receive, send: Send, request: _Request) -> None:
        body = await self._body(receive, request)
        message = _parse(body, pb.SubmitScanRequest())
        await self._call("SubmitScan", send, request, HTTPStatus.CREATED, self._submit_job, message)

    async def _submit_job(self, message: pb.SubmitScanRequest) -> pb.Job:
        job = await intake.submit_scan(self._queue, self._checks, spec_of(message))
        return job_to_proto(job)

    async def _job(self, send: Send, request: _Request, raw_id: str, *, cancel: bool) -> None:
        async def act(job_id: str) -> pb.Job:
            checked = intake.job_id(job_id)
            job = await (self._queue.cancel(checked) if cancel else self._queue.get(checked))
            return job_to_proto(job)

        name = "CancelJob" if cancel else "GetJob"
        await self._call(name, send, request, HTTPStatus.OK, act, raw_id)

    async def _call(
        self,
        name: str,
        send: Send,
        request: _Request,
        status: HTTPStatus,
        act: Callable[[Any], Awaitable[Message]],
        argument: object,
    ) -> None:
        """Authenticate, run ``act`` and answer with its message as JSON, or the error."""
        started, code = time.perf_counter(), "CANCELLED"
        try:
            self._tokens.check(request.headers.get("authorization"))
            reply = await act(argument)
            code = "OK"
        except errors.ScanJobsError as exc:
            grpc_code = code_of(exc)
            code = grpc_code.name
            http_status = _HTTP_STATUS.get(grpc_code, HTTPStatus.INTERNAL_SERVER_ERROR)
            await _send_error(send, http_status, code.lower(), exc.message, exc.reason)
            return
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            code = "INTERNAL"
            await _send_error(
                send, HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error", "INTERNAL"
            )
            return
        finally:
            self._record(name, code, started, argument if isinstance(argument, str) else "")
        extra = []
        if isinstance(reply, pb.Job) and status is HTTPStatus.CREATED:
            extra.append((b"location", f"/api/v1/jobs/{reply.id}".encode()))
        body = json_format.MessageToJson(reply, indent=None).encode()
        await _send(send, status, body, b"application/json", extra)

    async def _body(self, receive: Receive, request: _Request) -> bytes:
        """The request body, at most ``max_body_bytes``; JSON only.

        Raises:
            HttpError: 415 for another content type, 413 for a larger body.
        """
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/json":
            raise HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "invalid_argument",
                "send the body as application/json",
                "UNSUPPORTED_MEDIA_TYPE",
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(HTTPStatus.BAD_REQUEST, "canceled", "client went away", "GONE")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise _too_large(self._max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _page(self, send: Send, request: _Request) -> None:
        file = self._static.get("/index.html" if request.path == "/" else request.path)
        if file is None:
            raise HttpError(
                HTTPStatus.NOT_FOUND, "not_found", f"no such path: {request.path}", "NOT_FOUND"
            )
        _allow(request, "GET", "HEAD")
        body = file.read_bytes()
        content_type = _CONTENT_TYPES[file.suffix].encode()
        head = request.method == "HEAD"
        await _send(send, HTTPStatus.OK, body, content_type, _PAGE_HEADERS, head_only=head)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _own_origin(scope: Scope, request: _Request) -> str:
    return f"{scope.get('scheme', 'http')}://{request.headers.get('host', '')}"


def _allow(request: _Request, *methods: str) -> None:
    if request.method not in methods:
        raise HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "unimplemented",
            f"{request.method} is not allowed on {request.path}; use {' or '.join(methods)}",
            "METHOD_NOT_ALLOWED",
        )


def _refuse_native_grpc(request: _Request) -> None:
    """Native gRPC needs HTTP/2 trailers, which this port's HTTP/1.1 server cannot send."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/grpc") and not content_type.startswith(
        "application/grpc-web"
    ):
        raise HttpError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unimplemented",
            "native gRPC is served on the gRPC port (--listen); here use Connect or gRPC-Web",
            "UNSUPPORTED_MEDIA_TYPE",
        )


def _parse(body: bytes, message: Message) -> Any:
    try:
        return json_format.Parse(body or b"{}", message)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            "invalid_argument",
            f"the request could not be parsed: {exc}",
            "MALFORMED_REQUEST",
        ) from None


def _too_large(limit: int) -> HttpError:
    return HttpError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "resource_exhausted",
        f"the request body is larger than {limit} bytes",
        "MESSAGE_TOO_LARGE",
    )


def _with_cors(send: Send, origin: str) -> Send:
    async def send_with_cors(message: Message_) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                *message.get("headers", []),
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-expose-headers", _CORS_EXPOSE_HEADERS),
                (b"vary", b"Origin"),
            ]
        await send(message)

    return send_with_cors


async def _send_preflight(send: Send, origin: str) -> None:
    headers = [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-allow-methods", b"GET, POST"),
        (b"access-control-allow-headers", _CORS_ALLOW_HEADERS),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin"),
    ]
    await _send(send, HTTPStatus.NO_CONTENT, b"", None, headers)


async def _send_error(send: Send, status: HTTPStatus, code: str, message: str, reason: str) -> None:
    body = json.dumps({"code": code, "message": message, "reason": reason}).encode()
    extra = [(b"allow", b"GET, POST")] if status is HTTPStatus.METHOD_NOT_ALLOWED else []
    await _send(send, status, body, b"application/json", extra)


async def _send(
    send: Send,
    status: HTTPStatus,
    body: bytes,
    content_type: bytes | None,
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    head_only: bool = False,
) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *extra]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status.value, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})
