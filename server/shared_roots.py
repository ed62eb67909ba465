"""The leader's view of the roots, shared with every replica through PostgreSQL.

Only the leader watches (``server.leader``); the others would report every root OFF. The
leader writes each root's mode, reason and last reconcile into ``root_states`` whenever one
changes, and a replica that does not lead answers ListRoots from that table.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from .library_watch import LibraryWatcher, RootState, WatchMode

__all__ = ["SharedRootStates"]

log = logging.getLogger(__name__)

_UPSERT = (
    "INSERT INTO root_states (path, mode, reason, last_reconcile_ns) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (path) DO UPDATE SET mode = excluded.mode, reason = excluded.reason,"
    " last_reconcile_ns = excluded.last_reconcile_ns"
)


class SharedRootStates:
    """Publishes the watcher's states while this replica leads; reads the leader's otherwise.

    Args:
        url: the PostgreSQL database of every replica.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._watcher: LibraryWatcher | None = None
        self._changed = asyncio.Event()
        self._leading = False

    def on_state(self, state: RootState) -> None:
        """The watcher changed a root's state: publish it (when leading)."""
        self._changed.set()

    def watch(self, watcher: LibraryWatcher) -> None:
        """Publish (and answer, while leading) ``watcher``'s states."""
        self._watcher = watcher

    async def lead(self) -> None:
        """Watch the roots and publish their states, until cancelled (``leader.lead``'s work)."""
        watcher = self._watcher
        if watcher is None:
            raise RuntimeError("SharedRootStates.watch() was not called")
        self._leading = True
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(watcher.run())
                group.create_task(self._publish(watcher))
        finally:
            self._leading = False

    async def _publish(self, watcher: LibraryWatcher) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while True:
                self._changed.clear()
                rows = [
                    (s.path, s.mode.value, s.reason, s.last_reconcile_ns) for s in watcher.states()
                ]
                async with conn.cursor() as cur:
                    await cur.executemany(_UPSERT, rows)
                await self._changed.wait()

    async def states(self) -> list[RootState]:
        """Each root's state: this replica's while it leads, else the leader's last word."""
        local = self._watcher.states() if self._watcher is not None else []
        if self._leading:
            return local
        try:
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                cursor = await conn.execute(
                    "SELECT path, mode, reason, last_reconcile_ns FROM root_states"
                )
                shared = {row[0]: row for row in await cursor.fetchall()}
        except psycopg.Error as exc:
            log.warning("the leader's root states cannot be read", extra={"error": str(exc)})
            return local
        return [_shared(state, shared.get(state.path)) for state in local]


def _shared(local: RootState, row: tuple[str, str, str, int | None] | None) -> RootState:
    if row is None:
        return local
    _, mode, reason, last_ns = row
    return RootState(local.path, WatchMode(mode), reason, last_ns)
