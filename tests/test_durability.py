"""Restarts, crashes and drains with real server processes and real signals."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess
from tests.media import write_video

FILES = 1500


@pytest.fixture(scope="module")
def big_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    sample = write_video(root / "v00000.mp4").read_bytes()
    for n in range(1, FILES):
        sub = root / f"d{n % 30:02}"
        sub.mkdir(exist_ok=True)
        (sub / f"v{n:05}.mp4").write_bytes(sample)
    return root


def _start(root: Path, data: Path, *extra: str) -> ServerProcess:
    server = ServerProcess(
        "--root", str(root), "--data-dir", str(data), "--probe-processes", "2", *extra
    )
    assert server.first.get("message") == "serving", server.first
    return server


async def _events_until(
    stub: pb_grpc.ScanServiceAsyncStub, job_id: str, done_at_least: int, after: int = 0
) -> list[pb.JobEvent]:
    events = []
    async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=after)):
        events.append(event)
        if event.job.progress.files_done >= done_at_least:
            break
    return events


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_kill_9_mid_job_then_restart_resumes_and_loses_nothing(
    big_library: Path, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    extra: tuple[str, ...] = ()
    if backend == "postgres":  # the next start takes the job over once its lease lapsed
        extra = ("--database", request.getfixturevalue("postgres_url"), "--lease", "2")
    first = _start(big_library, data, *extra)
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        job = await stub.SubmitScan(pb.SubmitScanRequest(path=str(big_library)))
        before = await _events_until(stub, job.id, 200)
        first.stop(signal.SIGKILL)

    second = _start(big_library, data, *extra)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            after = [
                e
                async for e in stub.WatchJob(
                    pb.WatchJobRequest(job_id=job.id, after_sequence=before[-1].sequence)
                )
            ]
            videos = await _all_videos(stub)
    finally:
        second.stop()

    final = after[-1].job
    assert final.state == pb.JOB_STATE_COMPLETED
    assert final.attempts == 2
    assert final.result.added + final.result.unchanged == FILES
    assert final.result.unchanged >= 200  # what the first process committed is not redone
    assert len(videos) == len(set(videos)) == FILES
    sequences = [e.sequence for e in before + after]
    assert sequences == sorted(set(sequences))
    changes = _changes(before + after)
    if changes[0] == (pb.JOB_STATE_PENDING, 0):  # the watch may have begun before the start
        changes.pop(0)
    assert changes == [
        (pb.JOB_STATE_RUNNING, 1),
        (pb.JOB_STATE_RUNNING, 2),
        (pb.JOB_STATE_COMPLETED, 2),
    ]


def _changes(events: list[pb.JobEvent]) -> list[tuple[int, int]]:
    """State changes as a client sees them: each new (state, attempts) pair, in order."""
    keys = [(e.job.state, e.job.attempts) for e in events]
    return [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]


async def _all_videos(stub: pb_grpc.ScanServiceAsyncStub) -> list[str]:
    paths, token = [], ""
    while True:
        page = await stub.ListVideos(pb.ListVideosRequest(page_size=1000, page_token=token))
        paths += [v.path for v in page.videos]
        token = page.next_page_token
        if not token:
            return paths


async def test_sigterm_drains_then_the_next_start_finishes_the_job(
    big_library: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = _start(big_library, data, "--shutdown-grace", "5", "--lame-duck", "2")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="scanjobs.v1.ScanService")
        )
        assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
        job = await stub.SubmitScan(pb.SubmitScanRequest(path=str(big_library)))
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
        await stream.read()

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Sent while the server drains. (One sent in the instant grpc's own shutdown runs can
        # get CANCELLED instead: grpc/grpc#41785.)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitScan(pb.SubmitScanRequest(path=str(big_library)))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (await stream.read()) is not grpc.aio.EOF:
                pass
        code, lines = server.wait()
        elapsed = time.monotonic() - started

    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, "stream"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "submit"
    assert code == 0
    assert elapsed < 5
    assert lines[-1]["message"] == "server stopped"

    again = _start(big_library, data)
    try:
        async with grpc.aio.insecure_channel(again.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            events = [e async for e in stub.WatchJob(pb.WatchJobRequest(job_id=job.id))]
    finally:
        again.stop()
    assert events[-1].job.state == pb.JOB_STATE_COMPLETED
    assert events[-1].job.result.added + events[-1].job.result.unchanged == FILES


async def test_concurrent_retries_with_one_request_id_make_one_job(
    big_library: Path, tmp_path: Path
) -> None:
    server = _start(big_library, tmp_path / "data")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            request = pb.SubmitScanRequest(path=str(big_library), request_id="nightly-2026-11-26")
            jobs = await asyncio.gather(*(stub.SubmitScan(request) for _ in range(25)))
            listed = await stub.ListJobs(pb.ListJobsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await stub.SubmitScan(
                    pb.SubmitScanRequest(
                        path=str(big_library), recursive=False, request_id="nightly-2026-11-26"
                    )
                )
            await stub.CancelJob(pb.CancelJobRequest(job_id=jobs[0].id))
    finally:
        server.stop()
    assert len({j.id for j in jobs}) == 1
    assert len(listed.jobs) == 1
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
