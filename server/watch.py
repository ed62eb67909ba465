"""Watching a job: one :class:`Subscription` per watcher, and the watcher limits.

Watchers read from a per-watcher slot: state changes queue up (a job has only a handful),
progress is coalesced so that the latest progress wins. A slow watcher therefore costs one
slot, never an unbounded buffer, and never holds up the job or the other watchers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from .errors import ResourceExhausted, ScanJobsError
from .jobs import JobEvent

__all__ = ["Subscription", "check_watcher_limits"]


def check_watcher_limits(
    *, of_job: int, total: int, max_watchers_per_job: int, max_watchers: int
) -> None:
    """Admit one more watcher, given those of its job and those of this server.

    Raises:
        ResourceExhausted: either limit is reached (reason ``TOO_MANY_WATCHERS``).
    """
    if of_job >= max_watchers_per_job:
        raise ResourceExhausted(
            f"too many watchers of this job (limit {max_watchers_per_job})",
            reason="TOO_MANY_WATCHERS",
        )
    if total >= max_watchers:
        raise ResourceExhausted(
            f"too many watchers (limit {max_watchers})", reason="TOO_MANY_WATCHERS"
        )


class Subscription:
    """One watcher of one job: an async iterator of events, ended by the terminal event.

    Use it as an async context manager, or call :meth:`close`, so that it is forgotten at once
    when the reader goes away.
    """

    def __init__(self, on_close: Callable[[Subscription], None]) -> None:
        self._states: collections.deque[JobEvent] = collections.deque()
        self._progress: JobEvent | None = None
        self._last = 0
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._closed = False
        self._error: ScanJobsError | None = None
        self._finished = False

    def seed(self, backlog: Sequence[JobEvent], *, ended: bool = False) -> None:
        """Put ``backlog`` first, merged with whatever was pushed meanwhile."""
        merged = {e.sequence: e for e in backlog}
        for event in [*self._states, *([self._progress] if self._progress else [])]:
            merged.setdefault(event.sequence, event)
        self._states = collections.deque(merged[k] for k in sorted(merged))
        self._progress = None
        self._last = max(self._last, *merged) if merged else self._last
        self._finished = ended and not merged
        self._wakeup.set()

    def push(self, event: JobEvent) -> None:
        """Queue a state change, or replace the pending progress with ``event``."""
        if event.sequence <= self._last:
            return  # already queued (a replay raced with the live stream)
        self._last = event.sequence
        if event.state_change:
            self._progress = None
            self._states.append(event)
        else:
            self._progress = event
        self._wakeup.set()

    def fail(self, error: ScanJobsError) -> None:
        """End the stream with ``error`` after what is queued (e.g. on shutdown)."""
        self._error = error
        self._wakeup.set()

    def close(self) -> None:
        """Stop watching; idempotent."""
        if not self._closed:
            self._closed = True
            self._on_close(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JobEvent:
        while not self._finished:
            event = self._take()
            if event is not None:
                self._finished = event.job.terminal
                return event
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        self.close()
        raise StopAsyncIteration

    def _take(self) -> JobEvent | None:
        if self._states:
            return self._states.popleft()
        event, self._progress = self._progress, None
        return event

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
