"""One replica at a time leads (watches the roots, runs the reconcile schedule): the one
holding a PostgreSQL session advisory lock. The lock lives as long as the leader's
connection, so when the leader dies (or loses the database) another replica takes over at
its next try."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg

__all__ = ["LEADER_LOCK", "lead"]

log = logging.getLogger(__name__)

# Any fixed number: the key of the leader's advisory lock.
LEADER_LOCK = 0x5CA4_0D7


async def lead(url: str, work: Callable[[], Awaitable[None]], *, retry_s: float) -> None:
    """Run ``work`` whenever this replica holds the lock; try again every ``retry_s``.

    Runs until cancelled; ``work`` is cancelled when the lock's connection fails.
    """
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                row = await cursor.fetchone()
                if row is not None and row[0]:
                    await _hold(conn, work, retry_s)
        except psycopg.Error as exc:
            log.warning("leader lock lost or not reachable", extra={"error": str(exc)})
        except Exception:
            log.exception("the leader's work failed; trying again")
        await asyncio.sleep(retry_s)


async def _hold(
    conn: psycopg.AsyncConnection[object], work: Callable[[], Awaitable[None]], retry_s: float
) -> None:
    log.info("this replica leads: it watches the roots")
    task = asyncio.ensure_future(work())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=retry_s)
            await conn.execute("SELECT 1")  # the lock is only as alive as this connection
        task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("this replica no longer leads")
