"""Cancellation, streaming and shutdown races through a real server.

Files named ``gate*`` block inside a real probe worker until the test creates ``open-gate``
(see ``misbehaving_worker.py``), so each race is made to happen on purpose.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import (
    Running,
    ServeFactory,
    eventually,
    joined,
    probing,
    wait_terminal,
    watch_all,
)
from tests.media import write_video


async def _until(stub: Running, job_id: str, predicate: object) -> pb.Job:
    async for event in stub.stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        if predicate(event.job):  # type: ignore[operator]
            return event.job
    raise AssertionError("stream ended before the condition held")


def _library(root: Path, videos: int, gates: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sample = write_video(root / "v0000.mp4")
    for n in range(1, videos):
        (root / f"v{n:04}.mp4").write_bytes(sample.read_bytes())
    for n in range(gates):
        (root / f"gate{n}.mp4").write_bytes(sample.read_bytes())
    return root


async def test_cancel_mid_file_aborts_the_probe_in_flight(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", videos=0)
    s = await serve(root, misbehaving=True)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await _until(s, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING)
    await eventually(lambda: probing(root / "gate0.mp4"), "the gated file is inside a worker")

    reply = await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = await wait_terminal(s.stub, job.id)

    assert reply.cancel_requested
    assert final.state == pb.JOB_STATE_CANCELLED
    assert not (root / "open-gate").exists()  # the probe was killed, never finished
    # The killed worker is replaced: the pool still scans.
    (root / "open-gate").touch()
    again = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    assert (await wait_terminal(s.stub, again.id)).state == pb.JOB_STATE_COMPLETED


async def test_cancel_keeps_exactly_what_was_reported_in_the_catalog(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # The gated file sits in a folder of its own: a folder commits as a whole, so the 200
    # videos are catalogued while the gate holds the job in the middle of its scan.
    root = _library(tmp_path / "lib", videos=200, gates=0)
    _library(root / "held", videos=0, gates=1)
    s = await serve(root, misbehaving=True)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await _until(s, job.id, lambda j: j.result.added >= 50)
    await eventually(lambda: probing(root / "held" / "gate0.mp4"), "the gate holds the scan")

    await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = await wait_terminal(s.stub, job.id)
    catalogued = await s.stub.ListVideos(pb.ListVideosRequest(job_id=job.id, page_size=1000))

    assert final.state == pb.JOB_STATE_CANCELLED
    assert 50 <= final.result.added < 201
    assert len(catalogued.videos) == final.result.added
    assert final.progress.files_done == final.result.scanned


async def test_cancel_before_start_never_runs_the_job(serve: ServeFactory, tmp_path: Path) -> None:
    root = _library(tmp_path / "lib", videos=3)
    s = await serve(root, misbehaving=True, workers=1)
    first = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await _until(s, first.id, lambda j: j.state == pb.JOB_STATE_RUNNING)
    second = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))

    cancelled = await s.stub.CancelJob(pb.CancelJobRequest(job_id=second.id))
    (root / "open-gate").touch()
    await wait_terminal(s.stub, first.id)
    final = await s.stub.GetJob(pb.GetJobRequest(job_id=second.id))

    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert final.state == pb.JOB_STATE_CANCELLED
    assert not final.HasField("start_time")
    assert final.result.scanned == 0


async def test_cancel_after_completion_is_failed_precondition(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    await wait_terminal(s.stub, job.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_client_that_hangs_up_is_forgotten(serve: ServeFactory, tmp_path: Path) -> None:
    root = _library(tmp_path / "lib", videos=0)
    s = await serve(root, misbehaving=True)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    call = s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
    await call.read()
    assert s.app.queue.watcher_count(job.id) == 1

    call.cancel()
    await eventually(lambda: s.app.queue.watcher_count() == 0, "the server saw the hang-up")

    assert s.app.queue.watcher_count() == 0
    (root / "open-gate").touch()


async def test_watchers_joining_at_any_time_all_see_the_terminal_event(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", videos=20)
    s = await serve(root, misbehaving=True)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    early = asyncio.create_task(watch_all(s.stub, job.id))
    await _until(s, job.id, lambda j: j.state == pb.JOB_STATE_RUNNING)
    middle = await joined(s.stub, job.id)
    (root / "open-gate").touch()
    late = await watch_all(s.stub, (await early)[-1].job.id)

    for events in (await early, await middle, late):
        assert events[-1].job.state == pb.JOB_STATE_COMPLETED
        assert events[-1].job.result.added == 21
    assert len(late) == 1


async def test_shutdown_ends_open_streams_with_unavailable(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", videos=0)
    s = await serve(root, misbehaving=True)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    call = s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id))
    await call.read()

    stopping = asyncio.create_task(s.app.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while (await call.read()) is not grpc.aio.EOF:
            pass
    await stopping

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert s.app.workers.background_tasks == 0


async def test_cancel_stops_a_fast_scan_promptly(serve: ServeFactory, tmp_path: Path) -> None:
    # Fast probes make the cancel land while replies are already in flight: the scan must
    # still stop within a batch or two, not run on to the end.
    root = _library(tmp_path / "lib", videos=3000, gates=0)
    s = await serve(root)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await _until(s, job.id, lambda j: j.result.scanned >= 300)

    await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = await wait_terminal(s.stub, job.id)

    assert final.state == pb.JOB_STATE_CANCELLED
    assert final.result.scanned < 1500
