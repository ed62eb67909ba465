"""Three real server processes sharing one real PostgreSQL: any replica accepts any call."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, joined
from tests.media import write_video

FILES = 1500


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared-media")
    sample = write_video(root / "sample.mp4").read_bytes()
    (root / "sample.mp4").unlink()
    big = root / "big"
    for n in range(FILES):
        folder = big / f"d{n % 20:02}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{n:05}.mp4").write_bytes(sample)
    for n in range(30):
        small = root / "small" / f"s{n:02}"
        small.mkdir(parents=True)
        for k in range(2):
            (small / f"clip{k}.mp4").write_bytes(sample)
    return root


@pytest.fixture
def replicas(library: Path, postgres_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [
        ServerProcess("--root", str(library), "--database", postgres_url, "--lease", "2",
                      "--probe-processes", "1", "--data-dir", str(tmp_path / f"r{n}"))
        for n in range(3)
    ]  # fmt: skip
    for server in servers:
        assert server.first.get("message") == "serving", server.first
    yield servers
    for server in servers:  # every replica drains at once: a lame duck each, not in turn
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        server.wait()


def _owner(url: str, job_id: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT owner FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _replica_of(servers: list[ServerProcess], owner: str) -> int:
    names = [f"{socket.gethostname()}:{s.proc.pid}" for s in servers]
    return names.index(owner)


async def _events(address: str, job_id: str, after: int = 0) -> list[pb.JobEvent]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        request = pb.WatchJobRequest(job_id=job_id, after_sequence=after)
        return [e async for e in stub.WatchJob(request)]


async def _videos_of(stub: pb_grpc.ScanServiceStub, job_id: str) -> int:
    """How many videos the catalog lists for ``job_id``, over every page."""
    count, token = 0, ""
    while True:
        request = pb.ListVideosRequest(job_id=job_id, page_size=1000, page_token=token)
        page = await stub.ListVideos(request)
        count += len(page.videos)
        if not (token := page.next_page_token):
            return count


async def _until_running(address: str, job_id: str, files_done: int = 1) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            if event.job.progress.files_done >= files_done:
                return
    raise AssertionError("the job ended before it got going")


async def test_jobs_submitted_round_robin_each_run_exactly_once(
    replicas: list[ServerProcess], library: Path, postgres_url: str
) -> None:
    folders = sorted((library / "small").iterdir())
    channels = [grpc.aio.insecure_channel(s.address) for s in replicas]
    try:
        stubs = [pb_grpc.ScanServiceStub(c) for c in channels]
        jobs = [
            await stubs[n % 3].SubmitScan(pb.SubmitScanRequest(path=str(folder)))
            for n, folder in enumerate(folders)
        ]
        finals = [
            (await _events(replicas[n % 3].address, j.id))[-1].job for n, j in enumerate(jobs)
        ]
        listed = await stubs[1].ListJobs(pb.ListJobsRequest(page_size=100))
        videos = await stubs[2].ListVideos(pb.ListVideosRequest(page_size=1000))
    finally:
        for channel in channels:
            await channel.close()

    assert all(f.state == pb.JOB_STATE_COMPLETED and f.attempts == 1 for f in finals)
    assert sum(f.result.added for f in finals) == 60
    assert len(listed.jobs) == 30
    paths = [v.path for v in videos.videos]
    assert len(paths) == len(set(paths)) == 60
    owners = {_owner(postgres_url, j.id) for j in jobs}
    assert {_replica_of(replicas, o) for o in owners} <= {0, 1, 2}
    assert len(owners) >= 2  # the work spread over replicas


async def test_cancel_through_one_replica_is_seen_on_another(
    replicas: list[ServerProcess], library: Path, postgres_url: str
) -> None:
    big = str(library / "big")
    async with grpc.aio.insecure_channel(replicas[0].address) as channel:
        job = await pb_grpc.ScanServiceStub(channel).SubmitScan(pb.SubmitScanRequest(path=big))
    await _until_running(replicas[0].address, job.id, files_done=100)
    owner = _replica_of(replicas, _owner(postgres_url, job.id))
    canceller, watcher = [n for n in range(3) if n != owner]
    watch_channel = grpc.aio.insecure_channel(replicas[watcher].address)
    watching = await joined(pb_grpc.ScanServiceStub(watch_channel), job.id)  # before the cancel

    async with grpc.aio.insecure_channel(replicas[canceller].address) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        reply = await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        replied = time.monotonic()
        events = await watching
        ended = time.monotonic()
        catalogued = await _videos_of(stub, job.id)
    await watch_channel.close()

    final = events[-1].job
    assert reply.cancel_requested
    assert final.state == pb.JOB_STATE_CANCELLED
    assert 0 < final.result.scanned < FILES
    assert catalogued == final.result.added
    assert ended - replied < 5  # prompt: the owner learnt of it by NOTIFY (or the lease poll)


async def test_a_killed_owner_hands_its_job_to_another_replica(
    replicas: list[ServerProcess], library: Path, postgres_url: str
) -> None:
    big = str(library / "big")
    async with grpc.aio.insecure_channel(replicas[1].address) as channel:
        job = await pb_grpc.ScanServiceStub(channel).SubmitScan(pb.SubmitScanRequest(path=big))
    await _until_running(replicas[1].address, job.id, files_done=100)
    owner = _replica_of(replicas, _owner(postgres_url, job.id))

    before: list[pb.JobEvent] = []
    async with grpc.aio.insecure_channel(replicas[owner].address) as channel:
        stream = pb_grpc.ScanServiceStub(channel).WatchJob(pb.WatchJobRequest(job_id=job.id))
        before.append(await stream.read())
        replicas[owner].proc.send_signal(signal.SIGKILL)
        replicas[owner].proc.wait()
        with pytest.raises(grpc.aio.AioRpcError):
            while (event := await stream.read()) is not grpc.aio.EOF:
                before.append(event)
    other = next(n for n in range(3) if n != owner)
    after = await _events(replicas[other].address, job.id, after=before[-1].sequence)

    final = after[-1].job
    assert final.state == pb.JOB_STATE_COMPLETED
    assert final.attempts == 2
    assert final.result.added + final.result.unchanged == FILES
    sequences = [e.sequence for e in before + after]
    assert sequences == sorted(set(sequences))
    keys = [(e.job.state, e.job.attempts) for e in before + after]
    changes = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    assert changes == [
        (pb.JOB_STATE_RUNNING, 1),
        (pb.JOB_STATE_RUNNING, 2),
        (pb.JOB_STATE_COMPLETED, 2),
    ]
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT path) FROM videos WHERE path LIKE %s",
            (f"{big}/%".encode(),),
        ).fetchone()
    assert row == (FILES, FILES)
