"""A server whose root is on a share that is dead when it starts: it starts all the same, says
which root did not answer, scans its other roots, and answers for the dead one in time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, error_reason
from tests.fusefs import SlowShare

IO_TIMEOUT_S = 1.0
MARGIN_S = 5.0  # a busy machine's start-up and scheduling


@pytest.fixture
def dead_root(slow_share: SlowShare) -> Iterator[Path]:
    """A root below the share's folder `dead`, which stops answering before the server starts."""
    (slow_share.source / "dead" / "library").mkdir()
    slow_share.hang("dead")
    try:
        yield slow_share.path / "dead" / "library"
    finally:
        slow_share.release()


def test_a_root_dead_at_start_costs_a_warning_and_the_other_roots_scan(
    slow_share: SlowShare, dead_root: Path, tmp_path: Path
) -> None:
    healthy = slow_share.path / "shows"
    started = time.monotonic()
    server = ServerProcess(
        "--root", str(healthy), "--root", str(dead_root), "--data-dir", str(tmp_path / "d"),
        "--io-timeout", str(IO_TIMEOUT_S), "--shutdown-grace", "1", "--lame-duck", "0",
    )  # fmt: skip
    try:
        assert server.first.get("message") == "serving", server.lines
        assert time.monotonic() - started < IO_TIMEOUT_S + MARGIN_S
        warned = [x for x in server.lines if x.get("root") == str(dead_root)]
        assert warned, server.lines
        assert "did not answer" in str(warned[0]["message"])

        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            job = stub.SubmitScan(pb.SubmitScanRequest(path=str(healthy)))
            final = None
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30):
                final = event.job
            assert final is not None
            assert final.state == pb.JOB_STATE_COMPLETED
            assert final.result.added == 1  # shows/b.mkv

            asked = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitScan(pb.SubmitScanRequest(path=str(dead_root)), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(caught.value) == "IO_TIMEOUT"
            assert time.monotonic() - asked < IO_TIMEOUT_S + MARGIN_S
        slow_share.release()  # the processes stuck in it exit, and the server stops at once
    finally:
        code, _ = server.stop()
    assert code == 0
