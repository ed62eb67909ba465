"""Watching a job: one :class:`Subscription` per watcher, the pace of progress, the limits.

Watchers read from a per-watcher slot: state changes queue up (a job has only a handful),
progress is coalesced so that the latest progress wins. A slow watcher therefore costs one
slot, never an unbounded buffer, and never holds up the job or the other watchers.

What many watchers cost the server is the messages it sends, so progress also follows a
:class:`ProgressPace`: a budget of progress messages per second shared by every watcher of
the server. Each watcher is sent progress at most once per ``max(min_interval_s, watchers /
budget)`` seconds, so the total stays within the budget however many watch; state changes
and the terminal event are never held back, and each carries the job's latest progress.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from .errors import ResourceExhausted, ScanJobsError
from .jobs import JobEvent

__all__ = ["ProgressPace", "Subscription", "check_watcher_limits"]

_GOLDEN = (math.sqrt(5) - 1) / 2
"""Spreads the watchers' phases: the fractions of k * this are evenly spread for any k."""


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


class ProgressPace:
    """The budget of progress messages per second that all watchers of a server share.

    Each watcher is sent progress at most once per :attr:`interval_s`; while that is
    ``min_interval_s`` (few watchers) every published progress goes out at once. Watchers
    take their turns at phases spread over the interval, so that the budget is spent
    evenly, not in bursts, and a progress event is sent when it is published: on its turn,
    a watcher is sent the next progress published. If none comes within ``hold_s``, the
    one it holds goes out then, so that a job that reports seldom is never shown stale for
    long. After a quiet interval (a job that starts) a watcher waits for its phase again,
    so that the first progress does not go to every watcher at once.

    Args:
        budget_per_s: progress messages per second, summed over every watcher.
        min_interval_s: the least time between two progress messages to one watcher (the
            rate at which a job publishes progress).
    """

    def __init__(self, budget_per_s: float, min_interval_s: float) -> None:
        self._budget_per_s = budget_per_s
        self._min_interval_s = min_interval_s
        self.hold_s = 2 * min_interval_s
        self.watchers = 0
        self._joined = 0
        # Read for every watcher on every progress event: kept current, not computed there.
        self.paced = False
        """True when the budget, not the job's own rate, sets the watchers' pace."""
        self.interval_s = min_interval_s
        """Seconds between two progress messages to one watcher."""

    def join(self) -> float:
        """Count one more watcher; returns its phase, a fraction of the interval."""
        self.watchers += 1
        self._joined += 1
        self._count_changed()
        return (self._joined * _GOLDEN) % 1.0

    def leave(self) -> None:
        """Count one watcher fewer."""
        self.watchers -= 1
        self._count_changed()

    def _count_changed(self) -> None:
        self.paced = self.watchers > self._budget_per_s * self._min_interval_s
        self.interval_s = max(self._min_interval_s, self.watchers / self._budget_per_s)


class Subscription:
    """One watcher of one job: an async iterator of events, ended by the terminal event.

    Use it as an async context manager, or call :meth:`close`, so that it is forgotten at once
    when the reader goes away.
    """

    def __init__(self, on_close: Callable[[Subscription], None], pace: ProgressPace) -> None:
        self._states: collections.deque[JobEvent] = collections.deque()
        self._progress: JobEvent | None = None
        self._last = 0
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._closed = False
        self._error: ScanJobsError | None = None
        self._finished = False
        self._pace = pace
        self._loop = asyncio.get_running_loop()
        self._turn = self._loop.time() + self._pace.join() * self._pace.interval_s
        self._release: asyncio.TimerHandle | None = None

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
            self._progress = None  # the state change carries the latest progress
            self._states.append(event)
        else:
            self._progress = event
            if not self._my_turn():
                self._hold()
                return
        self._wakeup.set()

    def fail(self, error: ScanJobsError) -> None:
        """End the stream with ``error`` after what is queued (e.g. on shutdown)."""
        self._error = error
        self._wakeup.set()

    def close(self) -> None:
        """Stop watching; idempotent."""
        if not self._closed:
            self._closed = True
            self._pace.leave()
            if self._release is not None:
                self._release.cancel()
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
        if self._progress is None:
            return None
        if not self._my_turn():
            self._hold()
            return None
        event, self._progress = self._progress, None
        self._next_turn()
        return event

    # -- pace ------------------------------------------------------------------------------

    def _my_turn(self) -> bool:
        if not self._pace.paced:
            return True
        now, interval = self._loop.time(), self._pace.interval_s
        if now - self._turn >= interval:
            # Quiet for a whole interval (a job that starts, or reports seldom): wait for the
            # turn's phase again rather than all watchers taking this progress at once.
            self._turn += interval * math.ceil((now - self._turn) / interval)
        return now >= self._turn

    def _next_turn(self) -> None:
        """Move the turn past now, keeping its phase (so that turns stay spread out)."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        now, interval = self._loop.time(), self._pace.interval_s
        if self._pace.paced and now >= self._turn:
            self._turn += interval * ((now - self._turn) // interval + 1)

    def _hold(self) -> None:
        """Keep the progress until the turn: a newer one then wakes the reader, or this one
        goes out ``hold_s`` after the turn."""
        if self._release is None:
            at = self._turn + self._pace.hold_s
            self._release = self._loop.call_at(at, self._released)

    def _released(self) -> None:
        self._release = None
        self._wakeup.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
