"""The catalog contract, run over every Catalog implementation."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from scanjobs.server.catalog import Catalog, FileStamp, InMemoryCatalog, Seen, Video
from scanjobs.server.errors import InvalidArgument
from scanjobs.server.pgstore import PgCatalog, PgDatabase
from scanjobs.server.probe import MediaInfo
from scanjobs.server.store import Database, DatabaseCorrupt, SqliteCatalog

INFO = MediaInfo(
    "matroska,webm", 12.5, 4000, "vp9", 640, 360, Fraction(30000, 1001), "opus", 1, 2, 0
)


def video(path: bytes, size: int = 10, mtime: int = 1) -> Video:
    return Video(path, FileStamp(size, mtime), INFO, 0, 0, "")


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


async def test_commit_then_lookup_returns_stamps(catalog: Catalog) -> None:
    await catalog.commit("j1", [video(b"/m/a.mp4", 10, 5), video(b"/m/b.mp4", 20, 6)], [], 100)
    found = await catalog.lookup([b"/m/a.mp4", b"/m/missing.mp4", b"/m/b.mp4"])
    assert found == {
        b"/m/a.mp4": Seen(FileStamp(10, 5), 100),
        b"/m/b.mp4": Seen(FileStamp(20, 6), 100),
    }


async def test_lookup_handles_more_paths_than_one_statement_takes(catalog: Catalog) -> None:
    paths = [f"/m/{n:05}.mp4".encode() for n in range(1200)]
    await catalog.commit("j1", [video(p) for p in paths], [], 1)
    assert len(await catalog.lookup(paths)) == 1200


async def test_metadata_round_trips_exactly(catalog: Catalog) -> None:
    await catalog.commit("j1", [video(b"/m/a.mkv")], [], 100)
    (got,), _ = await catalog.list_videos(path_prefix=b"", job_id="", page_size=10, page_token="")
    assert got.info == INFO
    assert (got.first_seen_ns, got.last_seen_ns, got.job_id) == (100, 100, "j1")


async def test_recommit_keeps_first_seen_and_moves_last_seen(catalog: Catalog) -> None:
    await catalog.commit("j1", [video(b"/m/a.mp4", 1)], [], 100)
    await catalog.commit("j2", [video(b"/m/a.mp4", 2)], [], 200)
    await catalog.commit("j3", [], [b"/m/a.mp4"], 300)  # seen unchanged: not probed by j3
    (got,), _ = await catalog.list_videos(path_prefix=b"", job_id="", page_size=10, page_token="")
    assert (got.stamp.size_bytes, got.first_seen_ns, got.last_seen_ns, got.job_id) == (
        2,
        100,
        300,
        "j2",
    )


async def test_non_utf8_paths_survive(catalog: Catalog) -> None:
    odd = b"/m/caf\xe9\xff.mp4"
    await catalog.commit("j1", [video(odd)], [], 1)
    assert await catalog.lookup([odd]) == {odd: Seen(FileStamp(10, 1), 1)}
    (got,), _ = await catalog.list_videos(
        path_prefix=b"/m/", job_id="", page_size=10, page_token=""
    )
    assert got.path == odd


async def test_list_filters_by_prefix_and_job_and_pages(catalog: Catalog) -> None:
    await catalog.commit("j1", [video(f"/m/a/{n}.mp4".encode()) for n in range(5)], [], 1)
    await catalog.commit("j2", [video(b"/m/b/x.mp4"), video(b"/m/ab.mp4")], [], 1)

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
    await SqliteCatalog(db).commit("j1", [video(b"/m/a.mp4")], [], 1)
    await db.close()
    db = await Database.open(tmp_path / "c.db")
    assert await SqliteCatalog(db).lookup([b"/m/a.mp4"]) == {b"/m/a.mp4": Seen(FileStamp(10, 1), 1)}
    await db.close()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseCorrupt):
        await Database.open(path)


async def test_a_half_written_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = await Database.open(path)
    await SqliteCatalog(db).commit(
        "j1", [video(f"/m/{n}.mp4".encode()) for n in range(2000)], [], 1
    )
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
