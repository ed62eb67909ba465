"""The catalog contract, run over every Catalog implementation."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from scanjobs.server import store as store_module
from scanjobs.server.catalog import (
    Catalog,
    DirectoryChanges,
    Failure,
    FileStamp,
    Move,
    ScanCounts,
    Sighting,
    Summary,
    Video,
)
from scanjobs.server.catalog_memory import InMemoryCatalog
from scanjobs.server.errors import InvalidArgument
from scanjobs.server.pgstore import PgCatalog, PgDatabase
from scanjobs.server.probe import MediaInfo
from scanjobs.server.store import Database, DatabaseCorrupt, SqliteCatalog

INFO = MediaInfo(
    "matroska,webm", 12.5, 4000, "vp9", 640, 360, Fraction(30000, 1001), "opus", 1, 2, 0
)


def video(path: bytes, size: int = 10, mtime: int = 1, inode: int = 0) -> Video:
    return Video(path, FileStamp(size, mtime), INFO, 0, 0, "", 7, inode)


def changes(directory: bytes, now: int = 100, job: str = "j1", **kw: object) -> DirectoryChanges:
    return DirectoryChanges(job, directory, now, **kw)  # type: ignore[arg-type]


async def add(catalog: Catalog, *videos: Video, job: str = "j1", now: int = 100) -> None:
    by_dir: dict[bytes, list[Video]] = {}
    for v in videos:
        by_dir.setdefault(v.path.rpartition(b"/")[0] or b"/", []).append(v)
    for directory, probed in by_dir.items():
        await catalog.commit(changes(directory, now, job, probed=probed))


async def paths(catalog: Catalog, prefix: bytes = b"", **kw: object) -> list[bytes]:
    page, _ = await catalog.list_videos(
        path_prefix=prefix,
        job_id="",
        page_size=1000,
        page_token="",
        **kw,  # type: ignore[arg-type]
    )
    return [v.path for v in page]


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


async def test_a_directory_read_gives_its_rows_only(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4", 10, 5), video(b"/m/b.mp4", 20, 6))
    await add(catalog, video(b"/m/sub/c.mp4"), video(b"/m/sub/deeper/d.mp4"), video(b"/mx/e.mp4"))
    rows = await catalog.read_directory(b"/m")
    assert sorted(rows.videos) == [b"/m/a.mp4", b"/m/b.mp4"]
    known = rows.videos[b"/m/a.mp4"]
    assert (known.stamp, known.last_seen_ns, known.device, known.missing_ns) == (
        FileStamp(10, 5),
        100,
        7,
        None,
    )
    assert rows.subdirs == {b"/m/sub"}
    assert (await catalog.read_directory(b"/m/sub")).subdirs == {b"/m/sub/deeper"}
    assert (await catalog.read_directory(b"/")).subdirs == {b"/m", b"/mx"}


async def test_a_directory_read_takes_thousands_of_rows(catalog: Catalog) -> None:
    await add(catalog, *(video(f"/m/{n:05}.mp4".encode()) for n in range(1200)))
    assert len((await catalog.read_directory(b"/m")).videos) == 1200


async def test_metadata_round_trips_exactly(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mkv", inode=42))
    (got,), _ = await catalog.list_videos(path_prefix=b"", job_id="", page_size=10, page_token="")
    assert got.info == INFO
    assert (got.first_seen_ns, got.last_seen_ns, got.job_id) == (100, 100, "j1")
    assert (got.device, got.inode, got.missing_ns) == (7, 42, None)


async def test_recommit_keeps_first_seen_and_moves_last_seen(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4", 1), now=100)
    await add(catalog, video(b"/m/a.mp4", 2), job="j2", now=200)
    await catalog.commit(changes(b"/m", 300, "j3", seen=[Sighting(b"/m/a.mp4", 7, 9)]))
    (got,), _ = await catalog.list_videos(path_prefix=b"", job_id="", page_size=10, page_token="")
    assert (got.stamp.size_bytes, got.first_seen_ns, got.last_seen_ns, got.job_id) == (
        2,
        100,
        300,
        "j2",
    )
    assert got.inode == 9


async def test_missing_files_become_hidden_tombstones(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4"), video(b"/m/b.mp4"))
    counts = await catalog.commit(changes(b"/m", 200, missing=[b"/m/a.mp4", b"/m/zz.mp4"]))
    again = await catalog.commit(changes(b"/m", 300, missing=[b"/m/a.mp4"]))
    assert (counts.removed, again.removed) == (1, 0)
    assert await paths(catalog) == [b"/m/b.mp4"]
    assert await paths(catalog, include_missing=True) == [b"/m/a.mp4", b"/m/b.mp4"]
    assert (await catalog.read_directory(b"/m")).videos[b"/m/a.mp4"].missing_ns == 200


async def test_a_gone_directory_tombstones_everything_below_it(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/s/a.mp4"), video(b"/m/s/t/b.mp4"), video(b"/m/st.mp4"))
    await catalog.commit(
        changes(b"/m/s/t", failures=[Failure(b"/m/s/t/bad.mp4", FileStamp(1, 1), "corrupt")])
    )
    counts = await catalog.commit(changes(b"/m", 200, gone_dirs=[b"/m/s"]))
    assert counts.removed == 2
    assert await paths(catalog) == [b"/m/st.mp4"]
    failures, _ = await catalog.list_failures(path_prefix=b"", page_size=10, page_token="")
    assert failures == []


async def test_a_gone_directory_is_no_longer_catalogued_but_keeps_its_tombstones(
    catalog: Catalog,
) -> None:
    await add(catalog, video(b"/m/s/a.mp4"), video(b"/m/s/t/b.mp4"), video(b"/m/x.mp4"))
    await add(catalog, video(b"/m/q/c.mp4"))
    await catalog.commit(changes(b"/m", 200, gone_dirs=[b"/m/s"]))
    await catalog.commit(changes(b"/m/q", 200, missing=[b"/m/q/c.mp4"]))  # still there, empty
    gone, below_it = await catalog.read_directory(b"/m/s"), await catalog.read_directory(b"/m/s/t")
    assert (await catalog.read_directory(b"/m")).subdirs == {b"/m/q"}
    assert (gone.gen, gone.subdirs, below_it.gen) == (None, frozenset(), None)
    assert gone.videos[b"/m/s/a.mp4"].missing_ns == 200  # a scan of it, come back, finds it
    assert await catalog.purge_missing(300) == 3
    assert await paths(catalog, include_missing=True) == [b"/m/x.mp4"]
    assert (await catalog.read_directory(b"/m")).subdirs == frozenset()  # nothing left below


async def test_a_restore_clears_the_tombstone_without_a_probe(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4"))
    await catalog.commit(changes(b"/m", 200, missing=[b"/m/a.mp4"]))
    counts = await catalog.commit(changes(b"/m", 300, "j2", restored=[Sighting(b"/m/a.mp4", 8, 3)]))
    (got,), _ = await catalog.list_videos(path_prefix=b"", job_id="", page_size=10, page_token="")
    assert counts.restored == 1
    assert (got.missing_ns, got.last_seen_ns, got.job_id, got.device) == (None, 300, "j1", 8)


async def test_identities_are_found_among_many_asked_at_once(catalog: Catalog) -> None:
    await add(catalog, *(video(b"/m/%d.mp4" % i, inode=i) for i in range(1, 701, 2)))
    asked = [(7, i) for i in range(1, 701)] + [(8, 1)]  # over several statements' worth
    found = await catalog.find_identities(asked)
    assert sorted(k.inode for k in found) == list(range(1, 701, 2))
    assert {k.path for k in found} == {b"/m/%d.mp4" % i for i in range(1, 701, 2)}


async def test_a_move_keeps_probe_data_and_first_seen(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4", inode=5), now=50)
    assert [k.path for k in await catalog.find_identities([(7, 5), (7, 6)])] == [b"/m/a.mp4"]
    counts = await catalog.commit(
        changes(b"/n", 200, "j2", moved=[Move(b"/m/a.mp4", b"/n/b.mp4", 7, 5)])
    )
    (got,), _ = await catalog.list_videos(
        path_prefix=b"", job_id="", page_size=10, page_token="", include_missing=True
    )
    assert counts.moved == 1
    assert (got.path, got.info, got.first_seen_ns, got.last_seen_ns, got.job_id) == (
        b"/n/b.mp4",
        INFO,
        50,
        200,
        "j1",
    )
    assert list((await catalog.read_directory(b"/n")).videos) == [b"/n/b.mp4"]
    assert (await catalog.read_directory(b"/")).subdirs >= {b"/n"}


async def test_a_move_of_a_file_this_job_marked_missing_is_not_removed(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4", inode=5), now=50)
    first = await catalog.commit(changes(b"/m", 200, "j2", since_ns=150, missing=[b"/m/a.mp4"]))
    second = await catalog.commit(
        changes(b"/n", 210, "j2", since_ns=150, moved=[Move(b"/m/a.mp4", b"/n/a.mp4", 7, 5)])
    )
    assert (first.removed, second.removed, second.moved) == (1, -1, 1)
    assert await catalog.job_counts("j2") == ScanCounts(moved=1)


async def test_counts_are_committed_with_the_rows(catalog: Catalog) -> None:
    await catalog.commit(
        changes(b"/m", probed=[video(b"/m/a.mp4")], counts=ScanCounts(added=1, unchanged=4))
    )
    await catalog.commit(changes(b"/n", counts=ScanCounts(failed=2)))
    assert await catalog.job_counts("j1") == ScanCounts(added=1, unchanged=4, failed=2)
    assert await catalog.job_counts("other") == ScanCounts()


async def test_failures_are_remembered_and_listed_by_prefix(catalog: Catalog) -> None:
    bad = [Failure(f"/m/{n}.mp4".encode(), FileStamp(n, n), f"broken {n}") for n in range(5)]
    await catalog.commit(changes(b"/m", 100, failures=bad))
    await catalog.commit(
        changes(b"/x", failures=[Failure(b"/x/y.mp4", FileStamp(1, 2), "unreadable")])
    )
    rows = await catalog.read_directory(b"/m")
    assert rows.failures[b"/m/3.mp4"] == Failure(
        b"/m/3.mp4", FileStamp(3, 3), "broken 3", "j1", 100
    )
    listed, token = [], ""
    while True:
        page, token = await catalog.list_failures(path_prefix=b"/m/", page_size=2, page_token=token)
        listed += [f.path for f in page]
        if not token:
            break
    assert listed == [f.path for f in bad]


async def test_a_probed_file_is_no_longer_a_failure(catalog: Catalog) -> None:
    await catalog.commit(changes(b"/m", failures=[Failure(b"/m/a.mp4", FileStamp(1, 1), "bad")]))
    await add(catalog, video(b"/m/a.mp4"))
    assert (await catalog.read_directory(b"/m")).failures == {}


async def test_live_below_counts_videos_per_device(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/s/a.mp4"), video(b"/m/s/t/b.mp4"), video(b"/m/x.mp4"))
    await catalog.commit(changes(b"/m/s", missing=[b"/m/s/a.mp4"]))
    assert await catalog.live_below(b"/m/s", 7) == (1, 1)
    assert await catalog.live_below(b"/m/s", 8) == (1, 0)
    assert await catalog.live_below(b"/m/none", 7) == (0, 0)


async def test_retention_purges_only_old_tombstones(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4"), video(b"/m/b.mp4"), video(b"/m/c.mp4"))
    await catalog.commit(changes(b"/m", 200, missing=[b"/m/a.mp4"]))
    await catalog.commit(changes(b"/m", 300, missing=[b"/m/b.mp4"]))
    assert await catalog.purge_missing(250) == 1
    assert await paths(catalog, include_missing=True) == [b"/m/b.mp4", b"/m/c.mp4"]


async def test_listings_show_only_what_lies_under_the_roots(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4"), video(b"/m2/b.mp4"), video(b"/n/c.mp4"))
    await catalog.commit(changes(b"/n", failures=[Failure(b"/n/x.mp4", FileStamp(1, 1), "bad")]))
    assert await paths(catalog, roots=[b"/m"]) == [b"/m/a.mp4"]
    assert await paths(catalog, roots=[b"/m", b"/n/"]) == [b"/m/a.mp4", b"/n/c.mp4"]
    failures, _ = await catalog.list_failures(
        path_prefix=b"", page_size=10, page_token="", roots=[b"/m"]
    )
    assert failures == []
    assert await catalog.purge_outside([b"/m"]) == 3
    assert await paths(catalog) == [b"/m/a.mp4"]


async def test_non_utf8_paths_survive(catalog: Catalog) -> None:
    odd = b"/m/caf\xe9\xff.mp4"
    await add(catalog, video(odd))
    assert list((await catalog.read_directory(b"/m")).videos) == [odd]
    (got,), _ = await catalog.list_videos(
        path_prefix=b"/m/", job_id="", page_size=10, page_token=""
    )
    assert got.path == odd


async def test_list_filters_by_prefix_and_job_and_pages(catalog: Catalog) -> None:
    await add(catalog, *(video(f"/m/a/{n}.mp4".encode()) for n in range(5)))
    await add(catalog, video(b"/m/b/x.mp4"), video(b"/m/ab.mp4"), job="j2")

    pages, token = [], ""
    while True:
        page, token = await catalog.list_videos(
            path_prefix=b"/m/a/", job_id="", page_size=2, page_token=token
        )
        pages.append([v.path for v in page])
        if not token:
            break
    by_job, _ = await catalog.list_videos(path_prefix=b"", job_id="j2", page_size=10, page_token="")

    assert pages == [
        [b"/m/a/0.mp4", b"/m/a/1.mp4"],
        [b"/m/a/2.mp4", b"/m/a/3.mp4"],
        [b"/m/a/4.mp4"],
    ]
    assert [v.path for v in by_job] == [b"/m/ab.mp4", b"/m/b/x.mp4"]


async def test_malformed_page_token_is_invalid_argument(catalog: Catalog) -> None:
    with pytest.raises(InvalidArgument):
        await catalog.list_videos(path_prefix=b"", job_id="", page_size=1, page_token="@@@")


async def test_sqlite_catalog_survives_reopening(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "c.db")
    await add(SqliteCatalog(db), video(b"/m/a.mp4"))
    await db.close()
    db = await Database.open(tmp_path / "c.db")
    assert list((await SqliteCatalog(db).read_directory(b"/m")).videos) == [b"/m/a.mp4"]
    await db.close()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseCorrupt):
        await Database.open(path)


async def test_a_half_written_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = await Database.open(path)
    await add(SqliteCatalog(db), *(video(f"/m/{n}.mp4".encode()) for n in range(2000)))
    await db.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatabaseCorrupt):
        await Database.open(path)


async def test_a_database_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DatabaseCorrupt, match="newer"):
        await Database.open(path)


async def test_a_catalog_from_before_reconciliation_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    conn = sqlite3.connect(path)
    for script in store_module._MIGRATIONS[:3]:
        conn.executescript(script)
    row = (b"/m/s/a.mp4", 10, 1, *video_row_columns())
    conn.execute("INSERT INTO videos VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()

    db = await Database.open(path)
    catalog = SqliteCatalog(db)
    rows = await catalog.read_directory(b"/m/s")
    above = await catalog.read_directory(b"/m")
    await db.close()

    assert list(rows.videos) == [b"/m/s/a.mp4"]
    assert rows.videos[b"/m/s/a.mp4"].missing_ns is None
    assert above.subdirs == {b"/m/s"}


def video_row_columns() -> tuple[object, ...]:
    """The 15 columns after path, size and mtime in schema version 3."""
    return ("mov", 1.0, 1000, "h264", 64, 48, 25, 1, "", 0, 0, 0, 100, 100, "j0")


# -- directory summaries: a digest of a listing, trusted only while nothing else wrote --------

DIGEST = b"d" * 32


async def settle(catalog: Catalog, directory: bytes, now: int = 100, **kw: object) -> None:
    """Commit a summary for ``directory``, as a scan that read its rows first."""
    read = await catalog.read_directory(directory)
    await catalog.commit(changes(directory, now, summary=Summary(DIGEST, now, read.gen), **kw))


async def is_settled(catalog: Catalog, directory: bytes, fresh_after: int = 0) -> bool:
    return (await catalog.read_directory(directory, DIGEST, fresh_after)).settled


async def test_a_stored_summary_settles_its_directory_while_its_rows_are_fresh(
    catalog: Catalog,
) -> None:
    await add(catalog, video(b"/m/a.mp4"), video(b"/m/sub/b.mp4"))
    bad = Failure(b"/m/bad.mp4", FileStamp(3, 4), "corrupt", "j1", 100)
    await catalog.commit(changes(b"/m", failures=[bad]))
    assert not await is_settled(catalog, b"/m")
    await settle(catalog, b"/m", now=200)
    rows = await catalog.read_directory(b"/m", DIGEST, 200)
    assert (rows.settled, rows.videos, rows.subdirs) == (True, {}, {b"/m/sub"})
    assert rows.failures == {b"/m/bad.mp4": bad}
    assert not (await catalog.read_directory(b"/m", b"e" * 32, 200)).settled
    assert not await is_settled(catalog, b"/m", fresh_after=201)  # a row would be stale
    assert list((await catalog.read_directory(b"/m")).videos) == [b"/m/a.mp4"]


async def test_a_summary_is_stored_with_the_commit_that_catalogues_its_directory(
    catalog: Catalog,
) -> None:
    assert (await catalog.read_directory(b"/m")).gen is None
    summary = Summary(DIGEST, 100, None)
    await catalog.commit(changes(b"/m", probed=[video(b"/m/a.mp4")], summary=summary))
    assert await is_settled(catalog, b"/m")


@pytest.mark.parametrize("write", ["probed", "missing", "seen", "restored", "failures"])
async def test_another_write_in_a_settled_directory_clears_its_summary(
    catalog: Catalog, write: str
) -> None:
    await add(catalog, video(b"/m/a.mp4"))
    await catalog.commit(changes(b"/m", missing=[b"/m/gone.mp4"]))
    await settle(catalog, b"/m")
    other = {
        "probed": {"probed": [video(b"/m/b.mp4")]},
        "missing": {"missing": [b"/m/a.mp4"]},
        "seen": {"seen": [Sighting(b"/m/a.mp4", 7, 3)]},
        "restored": {"restored": [Sighting(b"/m/gone.mp4", 7, 0)]},
        "failures": {"failures": [Failure(b"/m/c.mp4", FileStamp(1, 1), "bad")]},
    }[write]
    await catalog.commit(changes(b"/m", 300, "j2", **other))
    assert not await is_settled(catalog, b"/m")


async def test_a_summary_is_not_stored_over_a_write_made_since_the_rows_were_read(
    catalog: Catalog,
) -> None:
    await add(catalog, video(b"/m/a.mp4"))
    read = await catalog.read_directory(b"/m")
    await catalog.commit(changes(b"/m", 200, "j2", probed=[video(b"/m/a.mp4", 11)]))
    await catalog.commit(changes(b"/m", 300, summary=Summary(DIGEST, 300, read.gen)))
    assert not await is_settled(catalog, b"/m")
    # Not catalogued when read, catalogued by another job since.
    unread = await catalog.read_directory(b"/n")
    await add(catalog, video(b"/n/a.mp4"), job="j2")
    summary = Summary(DIGEST, 100, unread.gen)
    await catalog.commit(changes(b"/n", probed=[video(b"/n/b.mp4")], summary=summary))
    assert not await is_settled(catalog, b"/n")


async def test_a_move_out_of_a_settled_directory_clears_its_summary(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4", inode=5), video(b"/n/b.mp4"))
    await settle(catalog, b"/m")
    await settle(catalog, b"/n")
    move = Move(b"/m/a.mp4", b"/n/a.mp4", 7, 5)
    await catalog.commit(changes(b"/n", 200, "j2", moved=[move]))
    assert not await is_settled(catalog, b"/m")
    assert not await is_settled(catalog, b"/n")  # its own summary was not asked for


async def test_a_gone_directory_clears_the_summaries_at_and_below_it(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/s/a.mp4"), video(b"/m/s/t/b.mp4"), video(b"/m/sx/c.mp4"))
    for directory in (b"/m/s", b"/m/s/t", b"/m/sx"):
        await settle(catalog, directory)
    await catalog.commit(changes(b"/m", 200, "j2", gone_dirs=[b"/m/s"]))
    settled = [await is_settled(catalog, d) for d in (b"/m/s", b"/m/s/t", b"/m/sx")]
    assert settled == [False, False, True]


async def test_purging_outside_the_roots_clears_every_summary(catalog: Catalog) -> None:
    await add(catalog, video(b"/m/a.mp4"), video(b"/n/b.mp4"))
    await settle(catalog, b"/m")
    await catalog.purge_outside([b"/m"])
    assert not await is_settled(catalog, b"/m")
