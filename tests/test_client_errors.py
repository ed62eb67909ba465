"""The client's error mapping against a scripted channel (grpcio-testing), no server needed.

grpcio-testing cannot drive grpc.aio servicers (grpc/grpc#24942); it does fit the client's
error handling, which only needs a call that ends with a given status and trailers.
"""

from __future__ import annotations

import threading

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from scanjobs.client.errors import (
    InvalidRequest,
    NotAllowed,
    ScanClientError,
    ServiceUnavailable,
    from_rpc_error,
)
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["ScanService"]


def _fail_with(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, bytes], ...] = ()
) -> grpc.RpcError:
    """Call GetJob on a testing channel and end it with ``code``; return the raised error."""
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    stub = pb_grpc.ScanServiceStub(channel)
    raised: list[grpc.RpcError] = []

    def call() -> None:
        try:
            stub.GetJob(pb.GetJobRequest(job_id="j"))
        except grpc.RpcError as exc:
            raised.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    _, request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["GetJob"])
    assert request.job_id == "j"
    rpc.terminate(None, trailers, code, details)
    thread.join(5)
    return raised[0]


def _details(code: int, message: str, reason: str) -> tuple[tuple[str, bytes], ...]:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="scanjobs"))
    status = status_pb2.Status(code=code, message=message, details=[info])
    return (("grpc-status-details-bin", status.SerializeToString()),)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
        (grpc.StatusCode.FAILED_PRECONDITION, InvalidRequest),
        (grpc.StatusCode.PERMISSION_DENIED, NotAllowed),
        (grpc.StatusCode.UNAUTHENTICATED, NotAllowed),
        (grpc.StatusCode.UNAVAILABLE, ServiceUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ServiceUnavailable),
        (grpc.StatusCode.INTERNAL, ScanClientError),
    ],
)
def test_codes_map_to_the_small_set_of_exceptions(
    code: grpc.StatusCode, cls: type[ScanClientError]
) -> None:
    error = from_rpc_error(_fail_with(code, "went wrong"))  # type: ignore[arg-type]
    assert type(error) is cls
    assert (error.code, error.message, error.reason) == (code, "went wrong", "")


def test_the_reason_comes_from_the_rich_status() -> None:
    trailers = _details(7, "/etc is outside the allowed roots", "PATH_OUTSIDE_ROOTS")
    raw = _fail_with(
        grpc.StatusCode.PERMISSION_DENIED, "/etc is outside the allowed roots", trailers
    )
    error = from_rpc_error(raw)  # type: ignore[arg-type]
    assert error.reason == "PATH_OUTSIDE_ROOTS"
    assert str(error) == "permission denied: /etc is outside the allowed roots"


def test_inconsistent_rich_status_is_ignored_not_raised() -> None:
    trailers = _details(5, "something else", "JOB_NOT_FOUND")  # code 5 does not match 7
    raw = _fail_with(grpc.StatusCode.PERMISSION_DENIED, "denied", trailers)
    error = from_rpc_error(raw)  # type: ignore[arg-type]
    assert (error.reason, error.message) == ("", "denied")
