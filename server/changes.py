"""The catalog's change log: every change of a catalogued video, in commit order.

Each catalog commit writes, in the same transaction as the rows it changes, one change per
video it added, updated, moved, removed or restored, numbered by a sequence strictly
increasing over the whole catalog. A listing reports the sequence it was taken at
(``Catalog.catalog_listing``), so a client lists, then follows the changes after that
number with :func:`follow`: no change is missed and none comes twice. A
:class:`ChangeFeed` wakes followers when a change is committed (in-process for SQLite, by
``NOTIFY`` for PostgreSQL); the rows are the truth, a wake-up only says "read again".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from .errors import OutOfRange

if TYPE_CHECKING:
    from .catalog import Catalog, Video

__all__ = [
    "ChangeFeed",
    "ChangeKind",
    "VideoChange",
    "check_history",
    "follow",
    "history_expired",
]


class ChangeKind(IntEnum):
    """What happened to a video; the values are stored and match ``VideoEventKind``."""

    ADDED = 1
    UPDATED = 2
    MOVED = 3
    REMOVED = 4
    RESTORED = 5


@dataclass(frozen=True, slots=True)
class VideoChange:
    """One change: the video as of the change, and for a move the path it had before."""

    sequence: int
    kind: ChangeKind
    video: Video
    previous_path: bytes | None
    time_ns: int


class ChangeFeed:
    """Wakes the followers of a catalog when a change is committed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        """An event set by the next :meth:`wake`; take it *before* reading the changes, so
        that a change committed after the read wakes the reader."""
        return self._event

    def wake(self) -> None:
        """Wake everyone waiting."""
        event, self._event = self._event, asyncio.Event()
        event.set()


def history_expired(after: int) -> OutOfRange:
    """The error for a position older (or newer) than the history this catalog keeps."""
    return OutOfRange(
        f"the catalog's change history after sequence {after} is no longer kept:"
        " list the videos again and watch from the listing's catalog_sequence",
        reason="HISTORY_EXPIRED",
    )


def check_history(after: int, *, pruned_through: int, high_water: int) -> None:
    """Raise :func:`history_expired` unless the changes after ``after`` are all kept.

    ``after`` 0 means "from the oldest kept change" and is always accepted; a sequence
    beyond the newest one is from another catalog (or one restored from a backup).
    """
    if after and (after < pruned_through or after > high_water):
        raise history_expired(after)


def _visible(change: VideoChange, prefix: bytes, roots: Sequence[bytes]) -> bool:
    from .catalog import under_roots

    paths = [change.video.path]
    if change.previous_path is not None:
        paths.append(change.previous_path)
    return any(p.startswith(prefix) and under_roots(p, roots) for p in paths)


async def follow(
    catalog: Catalog,
    *,
    path_prefix: bytes,
    after: int,
    roots: Sequence[bytes] = (),
    poll_s: float = 5.0,
    batch: int = 500,
) -> AsyncGenerator[VideoChange, None]:
    """The changes after ``after`` under ``path_prefix`` (and ``roots``), then each new one
    as it is committed; never ends by itself.

    Raises:
        OutOfRange: (HISTORY_EXPIRED) the changes after ``after`` are no longer all kept.
    """
    while True:
        wake = catalog.feed.waiter()
        changes = await catalog.changes_after(after, path_prefix, batch)
        for change in changes:
            after = change.sequence
            if _visible(change, path_prefix, roots):
                yield change
        if len(changes) < batch:
            # The poll is only a safety net under the wake-ups (a lost NOTIFY connection).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), poll_s)
