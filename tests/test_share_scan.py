"""Scans of a library on a slow network share, and on one with a dead folder (tests/fusefs.py)."""

from __future__ import annotations

import asyncio

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import ServeFactory, until_running, wait_terminal
from tests.fusefs import SHARE_VIDEOS, SlowShare


async def test_a_scan_of_a_slow_share_catalogs_every_video(
    slow_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(slow_share.path)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(slow_share.path)))
    final = await wait_terminal(s.stub, job.id)

    assert final.state == pb.JOB_STATE_COMPLETED
    videos = await s.stub.ListVideos(pb.ListVideosRequest(page_size=100))
    assert sorted(v.path for v in videos.videos) == sorted(
        str(slow_share.path / name) for name in SHARE_VIDEOS
    )


async def test_cancel_ends_a_scan_whose_walk_is_stuck_in_a_dead_folder(
    slow_share: SlowShare, serve: ServeFactory
) -> None:
    s = await serve(slow_share.path)
    slow_share.hang("dead")
    try:
        job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(slow_share.path)))
        await until_running(s.stub, job.id)
        await asyncio.to_thread(slow_share.wait_blocked, 1)  # the scan is stuck in the share

        reply = await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
        final = await wait_terminal(s.stub, job.id)
    finally:
        slow_share.release()  # before the server stops: its stuck thread must come back

    assert reply.cancel_requested
    assert final.state == pb.JOB_STATE_CANCELLED
