"""Listings made ahead: a scan worker's filesystem thread lists the directories of a task one
after the other while the worker's event loop reconciles the ones already listed.

A hand-off between the event loop and a thread costs about as much as listing a small folder
(a wake-up each way, and the GIL changing hands), so a rescan of unchanged folders, which is
mostly listing, used to spend a third of its time handing each folder to the thread and back.
Here the thread takes a whole task at once and keeps a few thousand entries ahead; the loop
takes each listing without waiting when it is already there. A waiting loop is woken once a
thousand entries are ready, or the thread has listed all it may, and looks for itself every
few milliseconds meanwhile: a wake-up for a few folders, not for each.

A filesystem call that never answers leaves the thread stuck: the directory waited for is
given up on once the thread has made no progress for ``--io-timeout``, and the worker then
asks to be replaced (no call is made on the thread after that).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from .deadline import no_answer
from .errors import IoTimeout
from .walk import Listing, Tree

__all__ = ["FsThread", "Listings"]

log = logging.getLogger(__name__)

# Entries (files, errors, sub-folders) listed ahead of the one being reconciled, at most (one
# listing more, however large, once this is reached): the memory of a few folders.
AHEAD_ENTRIES = 4096
# A loop waiting for a listing is woken once this many entries are ready (or the thread has
# listed all it may): one wake-up for a few small folders, not one each.
WAKE_ENTRIES = 1024
_POLL_S = 0.005


class FsThread:
    """One long-lived daemon thread for a worker's filesystem calls, started on first use."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            self._calls.get()()

    def submit(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the thread, after the calls before it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="fs-calls", daemon=True)
            self._thread.start()
        self._calls.put(call)


class Listings:
    """The listings of ``directories`` (relative to ``tree``'s folder), in order.

    Call :meth:`start` once, :meth:`next` once per directory, and :meth:`stop` when done
    (also early: the thread then lists no more).
    """

    def __init__(self, tree: Tree, directories: Sequence[bytes]) -> None:
        self._tree = tree
        self._directories = directories
        self._lock = threading.Condition()
        self._ready: collections.deque[Listing] = collections.deque()
        self._held = 0  # entries in ``_ready``
        self._error: BaseException | None = None
        self._stopped = False
        self._producing = True
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, fs: FsThread) -> None:
        """Begin listing on ``fs``'s thread."""
        self._loop = asyncio.get_running_loop()
        fs.submit(self._produce)

    def stop(self) -> None:
        """List no more (the listing under way, if any, is finished and dropped)."""
        with self._lock:
            self._stopped = True
            self._ready.clear()
            self._lock.notify()

    # -- on the filesystem thread -------------------------------------------------------------

    def _produce(self) -> None:
        try:
            with self._tree as tree:
                for directory in self._directories:
                    if not self._room():
                        return
                    self._put(tree.list(directory))
        except BaseException as exc:  # handed to the waiting task
            with self._lock:
                self._error = exc
        finally:
            with self._lock:
                self._producing = False
            self._wake()

    def _room(self) -> bool:
        """Wait until there is room ahead; False once stopped."""
        with self._lock:
            if not self._stopped and self._ready and self._held >= AHEAD_ENTRIES:
                self._wake_locked()
            while not self._stopped and self._ready and self._held >= AHEAD_ENTRIES:
                self._lock.wait()
            return not self._stopped

    def _put(self, listing: Listing) -> None:
        with self._lock:
            if self._stopped:
                return
            self._ready.append(listing)
            self._held += _entries(listing)
            if self._held >= WAKE_ENTRIES:
                self._wake_locked()

    def _wake(self) -> None:
        with self._lock:
            self._wake_locked()

    def _wake_locked(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self._loop.call_soon_threadsafe(_settle, waiter)

    # -- on the event loop --------------------------------------------------------------------

    def _take(self) -> Listing | None:
        """The next listing if it is there (raising what the thread raised, if it stopped)."""
        if self._ready:
            listing = self._ready.popleft()
            self._held -= _entries(listing)
            self._lock.notify()
            return listing
        if self._error is not None:
            raise self._error
        if not self._producing:
            raise RuntimeError("more listings asked for than directories given")
        return None

    async def next(self, timeout_s: float) -> Listing:
        """The next directory's listing.

        Raises:
            IoTimeout: the thread made no progress for ``timeout_s`` (a call that never
                answers; a folder of many files on slow storage takes as long as it takes).
        """
        loop = asyncio.get_running_loop()
        seen, check_at = -1, loop.time() + timeout_s
        while True:
            with self._lock:
                listing = self._take()
                if listing is not None:
                    return listing
                waiter = self._waiter = loop.create_future()
            # Woken when enough is ready, else looked at every _POLL_S: a folder ready
            # behind a long listing is not left waiting for it.
            done, _ = await asyncio.wait([waiter], timeout=min(_POLL_S, timeout_s))
            if done or self._ready:
                continue
            now = loop.time()
            if now < check_at:
                continue
            if self._tree.ops == seen:  # no call answered since the last look
                log.warning("a filesystem call got no answer in %g s", timeout_s)
                raise IoTimeout(no_answer(timeout_s))
            seen, check_at = self._tree.ops, now + timeout_s


def _entries(listing: Listing) -> int:
    return len(listing.items) + len(listing.folders) + 1


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
