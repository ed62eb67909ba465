"""The catalog's change log, run over every Catalog implementation: every change is logged
with the commit that makes it, in one sequence, and a listing and the changes after its
sequence fit together with no gap and no duplicate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scanjobs.server.catalog import Catalog, Move, Sighting
from scanjobs.server.catalog_memory import InMemoryCatalog
from scanjobs.server.changes import ChangeKind, VideoChange, follow
from scanjobs.server.errors import OutOfRange
from scanjobs.server.pgstore import PgCatalog, PgDatabase
from scanjobs.server.store import Database, SqliteCatalog
from tests.test_catalog import add, changes, video

A, B = b"/m/a.mp4", b"/m/b.mp4"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Catalog]:
    if request.param == "memory":
        yield InMemoryCatalog()
        return
    if request.param == "postgres":
        pg = await PgDatabase.open(request.getfixturevalue("postgres_url"))
        yield PgCatalog(pg)
        await pg.close()
        return
    db = await Database.open(tmp_path / "c.db")
    yield SqliteCatalog(db)
    await db.close()


async def log(catalog: Catalog, after: int = 0, prefix: bytes = b"") -> list[VideoChange]:
    return await catalog.changes_after(after, prefix, 1000)


def summary(changes: list[VideoChange]) -> list[tuple[ChangeKind, bytes, bytes | None]]:
    return [(c.kind, c.video.path, c.previous_path) for c in changes]


async def sequence(catalog: Catalog) -> int:
    _, _, at = await catalog.catalog_listing(path_prefix=b"", job_id="", page_size=1, page_token="")
    return at


async def test_every_kind_of_change_is_logged_with_the_video_as_of_it(catalog: Catalog) -> None:
    await add(catalog, video(A, inode=5), now=50)
    await add(catalog, video(A, size=20, inode=5), job="j2", now=60)
    await catalog.commit(changes(b"/m", 70, moved=[Move(A, B, 7, 5)]))
    await catalog.commit(changes(b"/m", 80, missing=[B]))
    await catalog.commit(changes(b"/m", 90, restored=[Sighting(B, 7, 6)]))
    got = await log(catalog)
    assert summary(got) == [
        (ChangeKind.ADDED, A, None),
        (ChangeKind.UPDATED, A, None),
        (ChangeKind.MOVED, B, A),
        (ChangeKind.REMOVED, B, None),
        (ChangeKind.RESTORED, B, None),
    ]
    sequences = [c.sequence for c in got]
    assert sequences == sorted(set(sequences))
    added, updated, moved, removed, restored = got
    assert (added.video.stamp.size_bytes, updated.video.stamp.size_bytes) == (10, 20)
    assert (updated.video.first_seen_ns, updated.video.job_id, updated.time_ns) == (50, "j2", 60)
    assert (moved.video.first_seen_ns, moved.video.last_seen_ns, moved.time_ns) == (50, 70, 70)
    assert (removed.video.missing_ns, restored.video.missing_ns) == (80, None)
    assert restored.video.inode == 6


async def test_commits_that_change_no_video_log_nothing(catalog: Catalog) -> None:
    await add(catalog, video(A), now=50)
    await catalog.commit(changes(b"/m", 60, missing=[A]))
    before = await sequence(catalog)
    await catalog.commit(changes(b"/m", 70, missing=[A, b"/m/never.mp4"]))  # already missing
    await catalog.commit(changes(b"/m", 80, seen=[Sighting(A, 7, 0)]))  # a tombstone: no-op
    await catalog.commit(changes(b"/m", 90, moved=[Move(b"/m/gone.mp4", B, 7, 1)]))
    assert await sequence(catalog) == before
    assert await log(catalog, before) == []


async def test_a_gone_directory_logs_each_present_video_below_it(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/s/t/b.mp4"), video(b"/m/s/a.mp4"), video(b"/m/st.mp4"))
    await catalog.commit(changes(b"/m/s", 150, missing=[b"/m/s/a.mp4"]))
    at = await sequence(catalog)
    await catalog.commit(changes(b"/m", 200, gone_dirs=[b"/m/s"]))
    assert summary(await log(catalog, at)) == [(ChangeKind.REMOVED, b"/m/s/t/b.mp4", None)]


async def test_a_listing_and_the_changes_after_it_fit_exactly(catalog: Catalog) -> None:
    await add(catalog, video(A), video(b"/m/c.mp4"), now=50)
    page, _, at = await catalog.catalog_listing(
        path_prefix=b"", job_id="", page_size=100, page_token=""
    )
    await add(catalog, video(B), now=60)
    await catalog.commit(changes(b"/m", 70, missing=[A]))
    state = {v.path for v in page}
    for change in await log(catalog, at):
        if change.kind == ChangeKind.REMOVED:
            state.remove(change.video.path)
        else:
            assert change.video.path not in state  # no duplicate
            state.add(change.video.path)
    page, _, _ = await catalog.catalog_listing(
        path_prefix=b"", job_id="", page_size=100, page_token=""
    )
    assert state == {v.path for v in page} == {B, b"/m/c.mp4"}


async def test_changes_are_filtered_by_path_or_previous_path(catalog: Catalog) -> None:
    await add(catalog, video(b"/x/a.mp4", inode=3), video(b"/y/b.mp4"), now=50)
    await catalog.commit(changes(b"/z", 60, moved=[Move(b"/x/a.mp4", b"/z/a.mp4", 7, 3)]))
    assert summary(await log(catalog, prefix=b"/x/")) == [
        (ChangeKind.ADDED, b"/x/a.mp4", None),
        (ChangeKind.MOVED, b"/z/a.mp4", b"/x/a.mp4"),
    ]
    assert summary(await log(catalog, prefix=b"/y")) == [(ChangeKind.ADDED, b"/y/b.mp4", None)]


async def test_a_position_older_than_the_kept_history_is_out_of_range(catalog: Catalog) -> None:
    await add(catalog, video(A), now=50)
    first = await sequence(catalog)
    await add(catalog, video(b"/m/c.mp4"), now=60)
    pruned_through = await sequence(catalog)
    await add(catalog, video(B), now=150)
    assert await catalog.prune_changes(100) == 2
    with pytest.raises(OutOfRange) as caught:
        await catalog.changes_after(first, b"", 10)
    assert caught.value.reason == "HISTORY_EXPIRED"
    assert summary(await log(catalog, pruned_through)) == [(ChangeKind.ADDED, B, None)]
    assert summary(await log(catalog, 0)) == [(ChangeKind.ADDED, B, None)]
    await catalog.prune_changes(1000)  # everything: the sequence still goes on from there
    newest = await sequence(catalog)
    assert newest > pruned_through and await log(catalog, newest) == []
    with pytest.raises(OutOfRange):  # a position from another catalog
        await catalog.changes_after(newest + 1, b"", 10)


class ReadSignal:
    """A catalog whose every read of the change log sets an event: the reader then waits."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.read = asyncio.Event()
        self.feed = catalog.feed

    async def changes_after(self, after: int, prefix: bytes, limit: int) -> list[VideoChange]:
        found = await self.catalog.changes_after(after, prefix, limit)
        self.read.set()
        return found


async def test_a_follower_is_woken_by_a_commit(catalog: Catalog) -> None:
    await add(catalog, video(A), now=50)
    at = await sequence(catalog)
    signal = ReadSignal(catalog)
    stream = follow(signal, path_prefix=b"", after=at, poll_s=3600)  # type: ignore[arg-type]
    waiting = asyncio.create_task(anext(stream))
    await signal.read.wait()  # the follower found nothing and waits for a wake-up
    await add(catalog, video(B), now=60)
    change = await asyncio.wait_for(waiting, 30)
    assert (change.kind, change.video.path, change.sequence) == (ChangeKind.ADDED, B, at + 1)
    await stream.aclose()


async def test_purging_outside_the_roots_logs_removals(catalog: Catalog) -> None:
    await add(catalog, video(b"/keep/a.mp4"), video(b"/drop/b.mp4"), now=50)
    at = await sequence(catalog)
    await catalog.purge_outside([b"/keep"])
    assert summary(await log(catalog, at)) == [(ChangeKind.REMOVED, b"/drop/b.mp4", None)]


async def test_a_replica_is_woken_by_another_replicas_commit(postgres_url: str) -> None:
    writer_db, reader_db = await PgDatabase.open(postgres_url), await PgDatabase.open(postgres_url)
    writer, reader = PgCatalog(writer_db), PgCatalog(reader_db)
    await reader.listen()
    try:
        signal = ReadSignal(reader)
        stream = follow(signal, path_prefix=b"", after=0, poll_s=3600)  # type: ignore[arg-type]
        waiting = asyncio.create_task(anext(stream))
        await signal.read.wait()
        await add(writer, video(A), now=50)
        change = await asyncio.wait_for(waiting, 30)
        assert (change.kind, change.video.path) == (ChangeKind.ADDED, A)
        await stream.aclose()
    finally:
        await reader.close()
        await writer_db.close()
        await reader_db.close()
