"""The job store in SQLite: each job's snapshot in ``jobs`` and its events in ``job_events``,
on the server's :class:`~server.store.Database` (see ``server.store`` for the schema)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from .jobs import JobEvent
from .jobstore import StoredJob, decode_job, encode_job, event_from_row, time_ns
from .store import Database

__all__ = ["SqliteJobStore"]


class SqliteJobStore:
    """The :class:`server.queue.JobStore` in the ``jobs`` and ``job_events`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> list[StoredJob]:
        def query(conn: sqlite3.Connection) -> list[StoredJob]:
            loaded = []
            for job_id, snapshot in conn.execute("SELECT id, snapshot FROM jobs ORDER BY rowid"):
                row = conn.execute(
                    "SELECT sequence, state_change, snapshot, time_ns FROM job_events"
                    " WHERE job_id = ? ORDER BY sequence DESC LIMIT 1",
                    (job_id,),
                ).fetchone()
                job = decode_job(snapshot)
                last = event_from_row(row) if row else JobEvent(0, job, True)
                loaded.append(StoredJob(job, last))
            return loaded

        return await self._db.run(query)

    async def append(self, events: Sequence[JobEvent]) -> None:
        event_rows = [
            (e.job.id, e.sequence, int(e.state_change), encode_job(e.job), time_ns(e.time))
            for e in events
        ]
        latest = {e.job.id: e.job for e in events}
        job_rows = [
            (j.id, j.state.value, j.spec.request_id, time_ns(j.end_time), encode_job(j))
            for j in latest.values()
        ]

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    "INSERT INTO jobs (id, state, request_id, end_ns, snapshot)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                    " state = excluded.state, end_ns = excluded.end_ns,"
                    " snapshot = excluded.snapshot",
                    job_rows,
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO job_events VALUES (?, ?, ?, ?, ?)", event_rows
                )

        await self._db.write(write)

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        def query(conn: sqlite3.Connection) -> list[JobEvent]:
            rows = conn.execute(
                "SELECT sequence, state_change, snapshot, time_ns FROM job_events"
                " WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, after_sequence),
            )
            return [event_from_row(r) for r in rows]

        return await self._db.run(query)

    async def thin(self, job_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "DELETE FROM job_events WHERE job_id = ? AND state_change = 0", (job_id,)
                )

        await self._db.run(write)

    async def prune(self, ended_before: datetime) -> list[str]:
        cutoff = time_ns(ended_before)

        def write(conn: sqlite3.Connection) -> list[str]:
            with conn:
                ids = [
                    r[0] for r in conn.execute("SELECT id FROM jobs WHERE end_ns < ?", (cutoff,))
                ]
                _delete_jobs(conn, ids)
            return ids

        return await self._db.run(write)

    async def delete(self, job_ids: Sequence[str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with conn:
                _delete_jobs(conn, job_ids)

        await self._db.run(write)


def _delete_jobs(conn: sqlite3.Connection, job_ids: Sequence[str]) -> None:
    conn.executemany("DELETE FROM job_events WHERE job_id = ?", [(i,) for i in job_ids])
    conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
