"""The server's SQLite writes while another connection (a scan worker's) holds the lock, and
who copies the write-ahead log back into the database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scanjobs.server import store
from scanjobs.server.store import Database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "c.db")
    await database.run(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
    yield database
    await database.close()


def worker_connection(db: Database) -> sqlite3.Connection:
    """A second connection, as a scan worker has, that starts its transactions itself."""
    return sqlite3.connect(db.path, isolation_level=None)


class Insert:
    """A one-row write transaction that counts its tries and the busy timeout each saw."""

    def __init__(self) -> None:
        self.timeouts: list[int] = []

    def __call__(self, conn: sqlite3.Connection) -> None:
        self.timeouts.append(conn.execute("PRAGMA busy_timeout").fetchone()[0])
        with conn:
            conn.execute("INSERT INTO t VALUES (1)")


async def test_a_write_takes_the_lock_once_another_connection_lets_it_go(db: Database) -> None:
    holder = worker_connection(db)
    holder.execute("BEGIN IMMEDIATE")
    insert = Insert()
    writing = asyncio.create_task(db.write(insert))
    await asyncio.sleep(0.05)
    assert not writing.done()
    holder.execute("COMMIT")
    await asyncio.wait_for(writing, 5)
    # It tried again itself, with SQLite's own wait off (whose sleeps grow to 100 ms).
    assert len(insert.timeouts) > 1 and set(insert.timeouts) == {0}
    assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 1
    assert await db.run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 5000
    holder.close()


async def test_a_write_gives_up_after_the_busy_timeout_and_writes_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_BUSY_TIMEOUT_MS", 50)
    holder = worker_connection(db)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await db.write(Insert())
    holder.execute("ROLLBACK")
    assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    assert await db.run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 50
    holder.close()


async def test_an_error_other_than_a_lock_is_not_tried_again(db: Database) -> None:
    tries = 0

    def broken(conn: sqlite3.Connection) -> None:
        nonlocal tries
        tries += 1
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await db.write(broken)
    assert tries == 1


async def test_the_workers_copy_the_log_back_and_the_server_seldom_does(db: Database) -> None:
    # A commit that takes the log past its connection's threshold copies it back (and syncs
    # the disk) within the commit: the server's writes, which job events wait for, leave that
    # to the scan workers' commits.
    server = await db.run(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    worker = await Database.attach(db.path)
    try:
        workers = await worker.run(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    finally:
        await worker.close()
    assert server == store._SERVER_CHECKPOINT_PAGES > 5 * workers
    assert workers == 1000  # SQLite's default
