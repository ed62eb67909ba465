"""Faults of where jobs and the catalog are kept, through the real server: a full disk, a
database outage, a data directory that cannot be written or vanished. Each answer is fast, has
a reason, and the server heals by itself when the fault goes away.

The full disk is a small tmpfs mounted by the test; the outage is PostgreSQL stopped and started
with ``pg_ctl`` (tests run as root).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import (
    ServeFactory,
    ServerProcess,
    gated_library,
    until_running,
    wait_terminal,
    watch_all,
)
from tests.media import write_video
from tests.postgres import Postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def outcome(call: Awaitable[Any]) -> tuple[str, str, str, float]:
    """(code, reason, message, seconds) of a call; code ``OK`` when it succeeded."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        reason = ""
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
        return exc.code().name, reason, exc.details() or "", time.monotonic() - started
    return "OK", "", "", time.monotonic() - started


VIDEOS = ["gate-v0.mp4", "gate-v1.mp4", "gate-v2.mp4"]


def library(root: Path) -> Path:
    """A gated folder (see ``gated_library``) with real videos that the gate holds too, so
    that nothing is catalogued before the test opens it."""
    gated_library(root)
    for name in VIDEOS:
        write_video(root / name)
    return root


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the data directory, so that the test can fill it."""
    folder = tmp_path / "small-data"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system has not one byte left; returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


async def until_ended(stub: Any, job_id: str) -> pb.Job:
    """The job once it ended, as GetJob shows it. Asked, not watched: while the disk is full
    its end cannot be kept, and only what is kept is announced to watchers."""
    async with asyncio.timeout(20):
        while True:
            job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
            if job.state not in (pb.JOB_STATE_PENDING, pb.JOB_STATE_RUNNING):
                return job
            await asyncio.sleep(0.02)


async def test_a_full_disk_fails_the_job_with_the_reason_refuses_writes_and_heals(
    serve: ServeFactory, tmp_path: Path, small_data_dir: Path
) -> None:
    root = library(tmp_path / "lib")
    s = await serve(root, misbehaving=True, workers=1, data_dir=small_data_dir)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await until_running(s.stub, job.id)
    filler = fill(small_data_dir)
    (root / "open-gate").touch()  # the probe returns; the catalog commit meets the full disk
    failed = await until_ended(s.stub, job.id)

    submit = await outcome(s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root))))
    watcher = asyncio.ensure_future(watch_all(s.stub, job.id))  # a read: it must work
    reads = [
        await outcome(s.stub.ListJobs(pb.ListJobsRequest())),
        await outcome(s.stub.ListVideos(pb.ListVideosRequest())),
    ]
    assert failed.state == pb.JOB_STATE_FAILED
    assert submit[:2] == ("RESOURCE_EXHAUSTED", "STORAGE_FULL")
    assert f"the data directory {small_data_dir} is out of space" in submit[2]
    assert [r[0] for r in reads] == ["OK", "OK"]

    filler.unlink()  # space again: what was refused is kept now, without a restart
    ended = (await watcher)[-1].job
    assert ended.state == pb.JOB_STATE_FAILED
    assert ended.error == f"the data directory {small_data_dir} is out of space"

    again = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    done = await wait_terminal(s.stub, again.id)
    videos = (await s.stub.ListVideos(pb.ListVideosRequest())).videos
    assert done.state == pb.JOB_STATE_COMPLETED
    assert (done.result.added, done.result.failed) == (3, 1)  # the gate file is not a video
    assert sorted(Path(v.path).name for v in videos) == VIDEOS


# -- SQLite I/O faults -------------------------------------------------------------------------


async def test_a_vanished_data_directory_is_unavailable_with_a_reason_never_internal(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    await wait_terminal(s.stub, job.id)
    shutil.rmtree(tmp_path / "data0")  # the serve fixture's data directory

    submit = await outcome(s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media))))
    videos = await outcome(s.stub.ListVideos(pb.ListVideosRequest()))
    kept = await outcome(s.stub.GetJob(pb.GetJobRequest(job_id=job.id)))

    for answer in (submit, videos):
        assert answer[:2] == ("UNAVAILABLE", "STORAGE_IO_ERROR")
        assert "was removed or replaced while the server ran" in answer[2]
    assert kept[0] == "OK"


async def test_a_read_only_database_is_unavailable_with_a_reason_and_reads_work(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    # The file system cannot be made read-only under open files; SQLite answers the same
    # SQLITE_READONLY when the connection is.
    await s.app.db.run(lambda conn: conn.execute("PRAGMA query_only = 1"))

    submit = await outcome(s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media))))
    videos = await outcome(s.stub.ListVideos(pb.ListVideosRequest()))

    assert submit[:2] == ("UNAVAILABLE", "STORAGE_IO_ERROR")
    assert "cannot be used: attempt to write a readonly database" in submit[2]
    assert videos[0] == "OK"


def test_a_read_only_data_directory_stops_the_start_with_a_clear_reason(
    media: Path, tmp_path: Path
) -> None:
    data = tmp_path / "ro-data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(data)], check=True)
    try:
        server = ServerProcess("--root", str(media), "--data-dir", str(data))
        code, lines = server.wait()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
    assert code == 3
    messages = [str(line["message"]) for line in lines]
    assert f"cannot open the database: cannot write in the data directory {data}: " \
        "Read-only file system" in messages  # fmt: skip


# -- a database outage -------------------------------------------------------------------------


async def _health_reaches(stream: Any, status: int) -> float:
    """Read the health stream until ``status``; returns when (monotonic seconds)."""
    while (reply := await stream.read()) is not grpc.aio.EOF:
        if reply.status == status:
            return time.monotonic()
    raise AssertionError("the health stream ended")


async def test_a_database_outage_fails_fast_turns_health_off_and_heals(
    serve: ServeFactory, tmp_path: Path, private_postgres: Postgres
) -> None:
    pg = private_postgres
    root = library(tmp_path / "lib")
    s = await serve(root, misbehaving=True, workers=1, database=pg.new_database(), lease_s=2.0)
    health = health_pb2_grpc.HealthStub(s.channel).Watch(health_pb2.HealthCheckRequest())
    assert (await health.read()).status == SERVING
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await until_running(s.stub, job.id)

    await asyncio.to_thread(pg.stop)
    await asyncio.wait_for(_health_reaches(health, NOT_SERVING), 2.0)
    answers = {
        "GetJob": await outcome(s.stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=5)),
        "SubmitScan": await outcome(
            s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)), timeout=5)
        ),
        "ListJobs": await outcome(s.stub.ListJobs(pb.ListJobsRequest(), timeout=5)),
        "ListVideos": await outcome(s.stub.ListVideos(pb.ListVideosRequest(), timeout=5)),
        "WatchJob": await outcome(watch_all(s.stub, job.id)),
    }
    (root / "open-gate").touch()  # the running job goes on and meets the outage

    await asyncio.to_thread(pg.start)
    back = time.monotonic()
    serving = await asyncio.wait_for(_health_reaches(health, SERVING), 5.0)
    health.cancel()
    ended = await asyncio.wait_for(wait_terminal(s.stub, job.id), 30)
    videos = (await s.stub.ListVideos(pb.ListVideosRequest())).videos

    for method, (code, reason, _, seconds) in answers.items():
        assert (code, reason) == ("UNAVAILABLE", "DATABASE_UNAVAILABLE"), method
        assert seconds < 1.0, method
    assert serving - back < 2.0
    result = ended.result
    assert ended.state == pb.JOB_STATE_COMPLETED
    assert (result.added, result.unchanged, result.failed) == (3, 0, 1)  # each file once
    assert sorted(Path(v.path).name for v in videos) == VIDEOS
