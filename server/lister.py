"""Listings on a scan worker's own thread, watched by a thread that answers for a stuck one.

A scan worker does one task at a time and its directories one after the other, so its event
loop has nothing else to do while a directory is listed: the listing runs right there. Listing
on a thread of its own instead made the loop and that thread take Python's lock from each
other for every folder: a rescan of unchanged folders (which is mostly listing) took a fifth
to a quarter more CPU that way.

A filesystem call that never answers (a share that is down) leaves the calling thread stuck in
the kernel, where no signal gets it out. A watchdog thread looks at the listing under way every
quarter of ``--io-timeout`` while a task runs (it is woken once per task, not per folder): once
the listing has made no progress (no call answered) for ``--io-timeout``, it gives the listing
up and answers for the stuck thread (the worker writes the directory's error and asks to be
replaced, see ``server.scanworker``). Should the call answer after all, the listing is dropped:
:meth:`Lister.call` raises :class:`~server.errors.IoTimeout`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from .deadline import no_answer
from .errors import IoTimeout
from .walk import Tree

__all__ = ["Lister"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# The watchdog looks this often per --io-timeout: a stuck call is given up on between one and
# one and a quarter timeouts after it stopped answering.
_LOOKS = 4


class _Call:
    """A watched call under way."""

    __slots__ = ("given_up", "path", "started", "tree")

    def __init__(self, tree: Tree, path: bytes) -> None:
        self.tree = tree
        self.path = path
        self.started = time.monotonic()
        self.given_up = False


class Lister:
    """Runs filesystem calls of a :class:`~server.walk.Tree` on the calling thread, watched.

    Args:
        timeout_s: how long a call may go without progress (``--io-timeout``).
        on_stuck: called on the watchdog's thread with the path of a folder whose call is
            given up on, while the calling thread is still stuck in it (or waits to return
            from it: nothing else runs on that thread meanwhile).
    """

    def __init__(self, timeout_s: float, on_stuck: Callable[[bytes], None]) -> None:
        self._timeout_s = timeout_s
        self._on_stuck = on_stuck
        self._lock = threading.Condition()
        self._armed = False
        self._current: _Call | None = None
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Keep the watchdog looking while the block runs (a task)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="fs-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._armed = True
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._armed = False

    def call(self, tree: Tree, path: bytes, fn: Callable[[], _T]) -> _T:
        """``fn()``, a call of ``tree`` about the folder ``path``, on this thread.

        Raises:
            IoTimeout: the watchdog gave the call up (it answered too late, if at all).
        """
        call = self._current = _Call(tree, path)  # set without the lock: one store
        try:
            result = fn()
        except BaseException:
            self._end(call)
            raise
        self._end(call)
        return result

    def _end(self, call: _Call) -> None:
        with self._lock:
            self._current = None
        if call.given_up:
            raise IoTimeout(no_answer(self._timeout_s))

    # -- on the watchdog's thread -------------------------------------------------------------

    def _watch(self) -> None:
        seen: tuple[_Call | None, int] = (None, 0)
        since = 0.0  # when the call seen last made progress
        with self._lock:
            while True:
                while not self._armed:
                    self._lock.wait()
                self._lock.wait(self._timeout_s / _LOOKS)
                call, now = self._current, time.monotonic()
                if call is None:
                    continue
                ops = call.tree.ops
                if call is not seen[0]:
                    since = call.started
                elif ops != seen[1]:
                    since = now
                seen = (call, ops)
                if now - since >= self._timeout_s:
                    self._give_up(call)

    def _give_up(self, call: _Call) -> None:
        log.warning("a filesystem call got no answer in %g s", self._timeout_s)
        call.given_up = True
        self._current = None
        try:
            self._on_stuck(call.path)
        except Exception:  # the watchdog keeps watching whatever its caller does
            log.exception("answering for a stuck filesystem call failed")
