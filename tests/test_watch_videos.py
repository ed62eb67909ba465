"""WatchVideos through a real server over SQLite and PostgreSQL: list, then watch from the
listing's catalog_sequence, with no gap and no duplicate; resume; HISTORY_EXPIRED."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import ServeFactory
from tests.media import write_video
from tests.test_reconcile import backend, scan  # noqa: F401 - the backend fixture

K = pb.VideoEventKind


async def take(stream: Any, count: int) -> list[pb.VideoEvent]:
    """The next ``count`` events of a stream (generous timeout: the machine is shared)."""
    events = []
    async with asyncio.timeout(60):
        while len(events) < count:
            events.append(await stream.read())
    return events


def kinds(events: list[pb.VideoEvent]) -> list[tuple[int, str, str]]:
    return [(e.kind, Path(e.video.path).name, Path(e.previous_path).name) for e in events]


async def test_a_list_then_a_watch_from_its_sequence_sees_each_later_change_once(
    serve: ServeFactory,
    tmp_path: Path,
    backend: dict[str, Any],  # noqa: F811
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    sample = write_video(tmp_path / "sample.mp4")
    shutil.copyfile(sample, lib / "a.mp4")
    shutil.copyfile(sample, lib / "b.mp4")
    s = await serve(lib, **backend)
    await scan(s, lib)
    listing = await s.stub.ListVideos(pb.ListVideosRequest())
    assert len(listing.videos) == 2 and listing.catalog_sequence > 0
    stream = s.stub.WatchVideos(pb.WatchVideosRequest(after_sequence=listing.catalog_sequence))

    (lib / "a.mp4").unlink()
    (lib / "b.mp4").rename(lib / "c.mp4")
    shutil.copyfile(sample, lib / "d.mp4")
    await scan(s, lib)
    events = await take(stream, 3)
    assert sorted(kinds(events)) == sorted(
        [(K.VIDEO_EVENT_KIND_REMOVED, "a.mp4", ""), (K.VIDEO_EVENT_KIND_MOVED, "c.mp4", "b.mp4"),
         (K.VIDEO_EVENT_KIND_ADDED, "d.mp4", "")]
    )  # fmt: skip
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and sequences[0] > listing.catalog_sequence
    added = next(e for e in events if e.kind == K.VIDEO_EVENT_KIND_ADDED)
    assert added.video.duration.ToNanoseconds() > 0 and added.video.width > 0
    removed = next(e for e in events if e.kind == K.VIDEO_EVENT_KIND_REMOVED)
    assert removed.video.HasField("missing_time")

    # A rescan that changes nothing sends nothing; the next change comes next, once.
    await scan(s, lib)
    (lib / "c.mp4").unlink()
    await scan(s, lib)
    (last,) = await take(stream, 1)
    assert kinds([last]) == [(K.VIDEO_EVENT_KIND_REMOVED, "c.mp4", "")]
    assert last.sequence > sequences[-1]
    stream.cancel()

    # Resuming after any event replays exactly what followed it.
    resumed = s.stub.WatchVideos(pb.WatchVideosRequest(after_sequence=sequences[0]))
    again = await take(resumed, 3)
    assert [e.sequence for e in again] == [*sequences[1:], last.sequence]
    resumed.cancel()

    # A prefix narrows the stream to paths (or previous paths) under it.
    narrowed = s.stub.WatchVideos(pb.WatchVideosRequest(path_prefix=str(lib / "b")))
    assert kinds(await take(narrowed, 2)) == [
        (K.VIDEO_EVENT_KIND_ADDED, "b.mp4", ""), (K.VIDEO_EVENT_KIND_MOVED, "c.mp4", "b.mp4")
    ]  # fmt: skip
    narrowed.cancel()


async def test_a_watch_from_before_the_kept_history_is_out_of_range(
    serve: ServeFactory,
    tmp_path: Path,
    backend: dict[str, Any],  # noqa: F811
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    write_video(lib / "a.mp4")
    s = await serve(lib, catalog_history_s=0.001, **backend)
    await scan(s, lib)
    first = (await s.stub.ListVideos(pb.ListVideosRequest())).catalog_sequence
    write_video(lib / "b.mp4")
    await scan(s, lib)  # starts by pruning the history older than a millisecond
    write_video(lib / "c.mp4")
    await scan(s, lib)  # and prunes b's change in turn
    stream = s.stub.WatchVideos(pb.WatchVideosRequest(after_sequence=first))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert b"HISTORY_EXPIRED" in status.details[0].value


async def test_watch_streams_end_with_unavailable_when_the_server_stops(
    serve: ServeFactory, tmp_path: Path
) -> None:
    s = await serve(tmp_path)
    stream = s.stub.WatchVideos(pb.WatchVideosRequest())
    await stream.wait_for_connection()
    stopping = asyncio.create_task(s.app.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(60):
            await stream.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await stopping
