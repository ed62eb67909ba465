"""Stopping keeps its promise: a drain that clients can retry, and nothing left behind."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from bench.harness import free_port
from scanjobs.server.probe import ProbeFailure, ProbePool
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import MISBEHAVING_WORKER, ServeFactory, eventually, probing
from tests.test_probe import target


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason


async def test_a_draining_server_answers_new_calls_unavailable_while_a_lame_duck(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media, lame_duck_s=5.0, shutdown_grace_s=10.0)
    health = health_pb2_grpc.HealthStub(s.channel).Watch(
        health_pb2.HealthCheckRequest(service="scanjobs.v1.ScanService")
    )
    assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING

    stopping = asyncio.create_task(s.app.stop())
    assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    with pytest.raises(grpc.aio.AioRpcError) as also:
        await s.stub.ListJobs(pb.ListJobsRequest())
    health.cancel()
    await stopping

    for error in (refused.value, also.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(error) == "SHUTTING_DOWN"


async def test_stop_closes_the_metrics_endpoint(serve: ServeFactory, media: Path) -> None:
    port = free_port()
    s = await serve(media, metrics_listen=f"127.0.0.1:{port}")

    await s.app.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_probe_pool_close_lets_idle_workers_exit_and_kills_a_stuck_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = ProbePool(2, probe_timeout_s=600.0, command=MISBEHAVING_WORKER)
    await pool.start()
    hang = tmp_path / "hang.mp4"
    hang.write_bytes(b"x")
    stuck = asyncio.create_task(pool.probe([target(hang)]))
    await eventually(lambda: probing(hang), "the hanging file is inside a worker")
    workers = list(pool._all)

    with caplog.at_level(logging.WARNING, logger="scanjobs.server.probe"):
        await pool.close(grace_s=1.0)
    outcomes = await stuck  # its worker is gone: the file failed, nothing hangs

    assert [type(o) for o in outcomes] == [ProbeFailure]

    codes = sorted(w.proc.returncode for w in workers)
    assert None not in codes  # every process reaped: none left behind
    # The idle one exited on its own (0), the stuck one was killed (-9; asyncio reports 255
    # when its child watcher lost the race to reap it).
    assert sorted(c == 0 for c in codes) == [False, True]
    killed = [r for r in caplog.records if "killed probe workers" in r.getMessage()]
    assert len(killed) == 1
