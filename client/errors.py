"""The client's exceptions: a small set that keeps the gRPC status code, message and reason.

ScanClientError          any failed call (``code``, ``message``, ``reason``)
├── InvalidRequest       INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS
├── NotAllowed           PERMISSION_DENIED, UNAUTHENTICATED
├── NotFound             NOT_FOUND
└── ServiceUnavailable   UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (worth a retry)
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "InvalidRequest",
    "NotAllowed",
    "NotFound",
    "ScanClientError",
    "ServiceUnavailable",
    "from_rpc_error",
]


class ScanClientError(Exception):
    """A call failed.

    Attributes:
        code: the gRPC status code.
        message: the server's message (safe to show).
        reason: the machine-readable ``google.rpc.ErrorInfo`` reason, or "" when absent.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name.lower().replace('_', ' ')}: {self.message}"


class InvalidRequest(ScanClientError):
    """The request cannot succeed as it is."""


class NotAllowed(ScanClientError):
    """Missing credentials, or a path outside the server's allowed roots."""


class NotFound(ScanClientError):
    """No such job or path."""


class ServiceUnavailable(ScanClientError):
    """The server is unreachable, shutting down, overloaded, or too slow: retry later."""


_CLASSES: dict[grpc.StatusCode, type[ScanClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.PERMISSION_DENIED: NotAllowed,
    grpc.StatusCode.UNAUTHENTICATED: NotAllowed,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServiceUnavailable,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> ScanClientError:
    """The client exception for a failed call, with the ErrorInfo reason when present."""
    code = error.code()
    reason = ""
    try:
        # AioRpcError has the code() and trailing_metadata() that from_call reads.
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details inconsistent with the status: ignore them
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    cls = _CLASSES.get(code, ScanClientError)
    return cls(code, error.details() or code.name, reason)
