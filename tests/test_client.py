"""The typed async client library against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from scanjobs.client import NotAllowed, NotFound, ScanClient, ServiceUnavailable, is_terminal
from scanjobs.client.errors import InvalidRequest
from scanjobs.server.app import start
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import MISBEHAVING_WORKER, ServeFactory, make_config


async def test_submit_watch_get_and_list(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    async with ScanClient(s.address) as client:
        job = await client.submit(str(media), recursive=True, timeout_s=30, request_id="r1")
        events = [e async for e in client.watch(job.id)]
        again = await client.submit(str(media), timeout_s=30, request_id="r1")
        got = await client.get(job.id)
        jobs = [j async for j in client.list_jobs(limit=10)]
        videos = [v async for v in client.list_videos(prefix=str(media / "sub"))]

    assert is_terminal(events[-1].job) and got.state == pb.JOB_STATE_COMPLETED
    assert again.id == job.id
    assert got.timeout.seconds == 30
    assert [j.id for j in jobs] == [job.id]
    assert sorted(Path(v.path).name for v in videos) == ["c.webm", "d.mov"]


async def test_errors_keep_code_message_and_reason(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    async with ScanClient(s.address) as client:
        with pytest.raises(NotAllowed) as outside:
            await client.submit("/etc")
        with pytest.raises(NotFound) as missing:
            await client.get("f" * 32)
        with pytest.raises(InvalidRequest) as relative:
            await client.submit("relative")
    assert outside.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert outside.value.reason == "PATH_OUTSIDE_ROOTS"
    assert str(outside.value) == "permission denied: /etc is outside the allowed roots"
    assert missing.value.reason == "JOB_NOT_FOUND"
    assert relative.value.reason == "PATH_NOT_ABSOLUTE"


async def test_unreachable_server_is_service_unavailable() -> None:
    async with ScanClient("127.0.0.1:9", timeout_s=0.5) as client:
        with pytest.raises(ServiceUnavailable):
            await client.get("x")


async def test_list_jobs_follows_pages(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    async with ScanClient(s.address) as client:
        ids = [(await client.submit(str(media))).id for _ in range(5)]
        for job_id in ids:
            [e async for e in client.watch(job_id)]
        all_jobs = [j.id async for j in client.list_jobs()]
        two = [j.id async for j in client.list_jobs(limit=2)]
    assert all_jobs == ids[::-1]
    assert two == ids[::-1][:2]


async def test_watch_resumes_after_the_server_restarts(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    (root / "gate.mp4").write_bytes(b"x")
    config = make_config(root, tmp_path / "data", shutdown_grace_s=1.0)
    first = await start(config, probe_command=MISBEHAVING_WORKER)
    address = f"127.0.0.1:{first.port}"
    async with ScanClient(address, backoff_s=0.05, reconnects=40) as client:
        job = await client.submit(str(root))
        events = []

        async def follow() -> None:
            async for event in client.watch(job.id):
                events.append(event)

        following = asyncio.create_task(follow())
        while not events or events[-1].job.state != pb.JOB_STATE_RUNNING:
            await asyncio.sleep(0.01)
        await first.stop()  # the stream breaks with UNAVAILABLE; the client retries
        (root / "open-gate").touch()
        again = dataclasses.replace(config, listen=address)
        second = await start(again, probe_command=MISBEHAVING_WORKER)
        try:
            await asyncio.wait_for(following, 20)
        finally:
            await second.stop()

    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    assert events[-1].job.state == pb.JOB_STATE_COMPLETED
    assert events[-1].job.attempts == 2


async def test_a_balanced_client_spreads_calls_over_every_address(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    first = await serve(media)
    second = await serve(media)
    target = f"ipv4:{first.address},{second.address}"  # two replicas behind one target
    async with ScanClient(target, balance=True) as client:
        jobs = [await client.submit(str(media)) for _ in range(4)]
    owners = set()
    for job in jobs:
        for server in (first, second):
            try:
                await server.stub.GetJob(pb.GetJobRequest(job_id=job.id))
                owners.add(server.address)
            except grpc.aio.AioRpcError:
                pass
    assert owners == {first.address, second.address}
