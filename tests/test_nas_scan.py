"""Scans of a slow network share with a folder that stops answering: the dead folder costs one
error within ``--io-timeout``, the rest is catalogued, nothing below it is marked missing, and
cancel stays prompt (tests/fusefs.py serves the share)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from scanjobs.server.deadline import no_answer
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory, wait_terminal
from tests.fusefs import SHARE_VIDEOS, SlowShare

IO_TIMEOUT_S = 1.0


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Server overrides that choose the catalog's backend."""
    if request.param == "postgres":
        return {"database": request.getfixturevalue("postgres_url")}
    return {}


async def _scan(s: Running, path: Path) -> pb.Job:
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(path)))
    return await wait_terminal(s.stub, job.id)


async def _catalogued(s: Running) -> set[str]:
    reply = await s.stub.ListVideos(pb.ListVideosRequest(page_size=1000))
    return {v.path for v in reply.videos}


def _counts(job: pb.Job) -> dict[str, int]:
    r = job.result
    names = ("added", "updated", "unchanged", "moved", "restored", "failed", "removed")
    return {n: getattr(r, n) for n in names if getattr(r, n)}


async def test_a_dead_folder_costs_one_error_and_keeps_its_videos(
    serve: ServeFactory, slow_share: SlowShare, backend: dict[str, Any]
) -> None:
    share = slow_share.path
    s = await serve(share, io_timeout_s=IO_TIMEOUT_S, **backend)
    first = await _scan(s, share)
    assert _counts(first) == {"added": 4}

    slow_share.hang("dead")
    try:
        started = time.monotonic()
        rescan = await _scan(s, share)
        took = time.monotonic() - started
    finally:
        slow_share.release()

    assert rescan.state == pb.JOB_STATE_COMPLETED
    assert _counts(rescan) == {"unchanged": 2}  # a.mp4 and shows/b.mkv
    errors = {e.path: e.message for e in rescan.result.errors}
    assert errors == {str(share / "dead"): no_answer(IO_TIMEOUT_S)}
    assert took < IO_TIMEOUT_S + 15  # the deadline, plus a busy machine's margin
    # Nothing below the dead folder is marked missing: the videos are all still listed.
    assert await _catalogued(s) == {str(share / name) for name in SHARE_VIDEOS}


async def test_cancel_while_a_folder_hangs_is_prompt(
    serve: ServeFactory, slow_share: SlowShare, backend: dict[str, Any]
) -> None:
    slow_share.hang("dead")
    try:
        s = await serve(slow_share.path, io_timeout_s=600.0, **backend)
        job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(slow_share.path)))
        await asyncio.to_thread(slow_share.wait_blocked, 1, 30.0)
        started = time.monotonic()
        await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        final = await wait_terminal(s.stub, job.id)
        latency = time.monotonic() - started
    finally:
        slow_share.release()

    assert final.state == pb.JOB_STATE_CANCELLED
    assert latency < 2.0  # the worker stuck in the share is killed, not waited for


async def test_two_jobs_on_a_root_with_a_dead_folder_both_end_with_its_error(
    serve: ServeFactory, slow_share: SlowShare, backend: dict[str, Any]
) -> None:
    share = slow_share.path
    slow_share.hang("dead")
    try:
        s = await serve(share, io_timeout_s=IO_TIMEOUT_S, **backend)
        jobs = [await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(share))) for _ in range(2)]
        finals = [await wait_terminal(s.stub, job.id) for job in jobs]
    finally:
        slow_share.release()

    for final in finals:
        assert final.state == pb.JOB_STATE_COMPLETED
        assert [e.path for e in final.result.errors] == [str(share / "dead")]
    assert await _catalogued(s) == {str(share / "a.mp4"), str(share / "shows" / "b.mkv")}
