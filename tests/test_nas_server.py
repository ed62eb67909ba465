"""The server over a share with a dead folder (tests/fusefs.py): every call answers in time,
nothing accumulates, health stays SERVING, and SIGTERM still stops it within its grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from scanjobs.v1.scanjobs_connect import ScanServiceClient
from tests.conftest import (
    Running,
    ServeFactory,
    ServerProcess,
    error_reason,
    eventually,
    until_running,
    wait_terminal,
)
from tests.fusefs import SlowShare

IO_TIMEOUT_S = 1.0
MARGIN_S = 2.0  # a busy machine's scheduling, never part of what a test waits for


@pytest.fixture
def dead_share(slow_share: SlowShare) -> Iterator[SlowShare]:
    """The share with its folder `dead` hung; released after the test, whatever happens."""
    slow_share.hang("dead")
    try:
        yield slow_share
    finally:
        slow_share.release()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest) -> dict[str, str]:
    """Config overrides for the catalog: SQLite under the data dir, or PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"database": request.getfixturevalue("postgres_url")}


async def _let_go(share: SlowShare) -> None:
    """Release the share, and wait until every process it held has exited and been reaped
    (while this test's loop still runs: asyncio's child watcher reports to it)."""
    share.release()
    await eventually(
        lambda: not any(_state(p) in ("D", "Z") for p in _descendants(os.getpid(), everyone=True)),
        "the processes stuck in the share exited",
    )


async def _submit_fails(
    stub: pb_grpc.ScanServiceAsyncStub, path: Path, timeout_s: float
) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitScan(pb.SubmitScanRequest(path=str(path)), timeout=timeout_s)
    return caught.value, time.monotonic() - started


async def test_a_submit_of_a_path_inside_a_dead_folder_is_unavailable_io_timeout_in_time(
    dead_share: SlowShare, serve: ServeFactory, storage: dict[str, str]
) -> None:
    s = await serve(dead_share.path, io_timeout_s=IO_TIMEOUT_S, **storage)

    error, elapsed = await _submit_fails(s.stub, dead_share.path / "dead" / "deeper", 30.0)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) == "IO_TIMEOUT"
    assert "is the share down?" in (error.details() or "")
    assert str(dead_share.path / "dead" / "deeper") in (error.details() or "")
    assert IO_TIMEOUT_S * 0.9 <= elapsed < IO_TIMEOUT_S + MARGIN_S
    assert (await s.stub.ListJobs(pb.ListJobsRequest())).jobs == []  # nothing was queued
    await _let_go(dead_share)


async def test_a_submit_whose_own_deadline_is_nearer_than_the_io_timeout_is_answered_before_it(
    dead_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(dead_share.path, io_timeout_s=30.0)

    error, elapsed = await _submit_fails(s.stub, dead_share.path / "dead" / "deeper", 1.5)

    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert error_reason(error) == "IO_TIMEOUT"
    assert elapsed < 1.5
    await _let_go(dead_share)


async def test_health_and_other_calls_answer_while_a_submit_and_a_scan_are_stuck_in_the_share(
    dead_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(dead_share.path, io_timeout_s=IO_TIMEOUT_S)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(dead_share.path)))
    await until_running(s.stub, job.id)
    await asyncio.to_thread(dead_share.wait_blocked, 1)  # the scan is stuck in `dead`
    stuck = asyncio.create_task(_submit_fails(s.stub, dead_share.path / "dead" / "x", 30.0))

    health = health_pb2_grpc.HealthStub(s.channel)
    for _ in range(3):
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = await s.stub.ListJobs(pb.ListJobsRequest(), timeout=1.0)
        assert [j.id for j in listed.jobs] == [job.id]
    error, _ = await stuck
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)

    assert error_reason(error) == "IO_TIMEOUT"
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await _let_go(dead_share)


async def test_ten_submits_into_a_dead_folder_leave_no_thread_stuck_in_the_server(
    dead_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(dead_share.path, io_timeout_s=IO_TIMEOUT_S)
    before = set(threading.enumerate())

    answers = [
        await _submit_fails(s.stub, dead_share.path / "dead" / f"x{i}", 30.0) for i in range(10)
    ]

    assert [error_reason(e) for e, _ in answers] == ["IO_TIMEOUT"] * 10
    assert all(elapsed < IO_TIMEOUT_S + MARGIN_S for _, elapsed in answers)
    # The checks are stuck in helper processes, never in the server: after 8 stuck checks
    # the helper is replaced (and, if unkillable, abandoned and counted). Left in the server:
    # asyncio's waitpid threads (daemons) of the abandoned helper and of its replacement.
    left = [t for t in threading.enumerate() if t not in before]
    assert all(t.daemon and t.name.startswith("asyncio-waitpid") for t in left), left
    assert len(left) <= 2
    helpers = [p for p in _descendants(os.getpid()) if b"rootcheck" in _cmdline(p)]
    assert 1 <= len(helpers) <= 2
    assert _abandoned(s) <= 1
    await _let_go(dead_share)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(pid: int, *, everyone: bool = False) -> set[int]:
    """Every live process below ``pid`` (from /proc: each task's children); zombies too
    when ``everyone``."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    stack.append(child)
    return found if everyone else {p for p in found if _state(p) not in ("Z", "X", "")}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _threads() -> int:
    """The threads of this process but the test's own (``asyncio.to_thread``)."""
    return sum(not t.name.startswith("asyncio_") for t in threading.enumerate())


def _abandoned(s: Running) -> float:
    value = s.app.metrics.registry.get_sample_value("scanjobs_abandoned_processes_total")
    return value or 0.0


async def test_ten_scans_stuck_in_a_dead_folder_and_cancelled_leave_only_abandoned_processes(
    slow_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(slow_share.path, io_timeout_s=30.0, workers=1, probe_processes=2)
    await eventually(lambda: s.app.workers.background_tasks == 0, "the workers started")
    processes = _descendants(os.getpid())
    threads = _threads()
    slow_share.hang("dead")
    try:
        for i in range(10):
            job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(slow_share.path)))
            await until_running(s.stub, job.id)
            await asyncio.to_thread(slow_share.wait_blocked, i + 1)  # stuck in `dead`
            await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
            assert (await wait_terminal(s.stub, job.id)).state == pb.JOB_STATE_CANCELLED
        await eventually(lambda: s.app.workers.background_tasks == 0, "replaced and reaped")
        # A killed worker in uninterruptible sleep (a listing of `dead`) cannot exit: it is
        # abandoned, counted and logged, and never waited for. Nothing else is left.
        live = {p for w in s.app.workers.pids() for p in {w, *_descendants(w)}}
        stuck = _descendants(os.getpid()) - processes - live
        abandoned = _abandoned(s)
        assert len(s.app.workers.pids()) == 2
        assert stuck == {p for p in stuck if _state(p) == "D"}
        assert len(stuck) <= abandoned <= 10  # one may exit after it was given up on
        assert _threads() <= threads + abandoned  # a waitpid thread each
    finally:
        slow_share.release()
    await _let_go(slow_share)
    await eventually(
        lambda: len(_descendants(os.getpid())) <= len(processes), "the abandoned exited"
    )
    await eventually(lambda: _threads() <= threads, "their threads ended")


def test_sigterm_stops_a_server_within_its_grace_period_while_it_is_stuck_in_a_dead_share(
    dead_share: SlowShare, tmp_path: Path
) -> None:
    grace_s = 2.0
    server = ServerProcess(
        "--root", str(dead_share.path), "--data-dir", str(tmp_path / "d"),
        "--io-timeout", "30", "--shutdown-grace", str(grace_s), "--lame-duck", "0",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            job = stub.SubmitScan(pb.SubmitScanRequest(path=str(dead_share.path)))
            dead_share.wait_blocked(1)  # the scan is stuck in `dead` (given up on in 30 s)
            with pytest.raises(grpc.RpcError) as caught:  # and a root check's thread too
                stub.SubmitScan(  # answered before its own deadline
                    pb.SubmitScanRequest(path=str(dead_share.path / "dead" / "x")), timeout=1.5
                )
            dead_share.wait_blocked(2)
            assert error_reason(caught.value) == "IO_TIMEOUT"
            assert stub.GetJob(pb.GetJobRequest(job_id=job.id)).state == pb.JOB_STATE_RUNNING

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        elapsed = time.monotonic() - started
        dead_share.release()  # its abandoned children, stuck in the share, hold its log pipe
        code, lines = server.wait()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()

    assert code == 0
    assert elapsed < grace_s + MARGIN_S
    assert lines[-1]["message"] == "server stopped"


async def test_connect_and_rest_submits_into_a_dead_folder_answer_unavailable_in_time(
    dead_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(dead_share.path, io_timeout_s=2.0, http_listen="127.0.0.1:0")
    base = f"http://127.0.0.1:{s.app.http_port}"
    inside = str(dead_share.path / "dead" / "deeper")

    started = time.monotonic()
    async with ScanServiceClient(base, timeout_ms=1000) as connect:  # nearer than 2 s
        with pytest.raises(ConnectError) as caught:
            await connect.submit_scan(pb.SubmitScanRequest(path=inside))
    connect_s = time.monotonic() - started
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.post(f"{base}/api/v1/scans", json={"path": inside})
    rest_s = time.monotonic() - started

    # UNAVAILABLE, not DEADLINE_EXCEEDED: the server answered before the client's own 1 s
    # deadline; the time measured here also holds the client's own work on a busy machine.
    assert caught.value.code == Code.UNAVAILABLE, caught.value
    assert "is the share down?" in caught.value.message
    assert connect_s < 1.0 + MARGIN_S
    assert response.status_code == 503
    assert response.json()["reason"] == "IO_TIMEOUT"
    assert 2.0 * 0.9 <= rest_s < 2.0 + MARGIN_S
    await _let_go(dead_share)
