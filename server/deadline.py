"""Filesystem calls with a deadline, on threads that never hold the server up.

A call into a share that stopped answering blocks its thread in the kernel, for minutes or for
ever, and Python cannot interrupt it. :class:`FsCalls` runs such calls on daemon threads (so
that a stuck one never keeps the interpreter from exiting on SIGTERM), gives up on a call at
its deadline with :class:`~server.errors.IoTimeout`, and bounds how many threads may be stuck
at once: past that, a call fails at once instead of leaving one more thread behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from .errors import IoTimeout

__all__ = ["FsCalls", "no_answer"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def no_answer(timeout_s: float) -> str:
    """The per-file (or per-folder) error of an operation past its deadline."""
    return f"no answer from the filesystem in {timeout_s:g} s; is the share down?"


class FsCalls:
    """Runs blocking filesystem calls with a deadline.

    Args:
        timeout_s: the deadline of each call (``--io-timeout``).
        max_stuck: threads that may be stuck in calls past their deadline at once.
    """

    def __init__(self, timeout_s: float, max_stuck: int = 8) -> None:
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_stuck)
        self._stuck = 0
        self._lock = threading.Lock()

    @property
    def stuck(self) -> int:
        """Calls past their deadline whose threads have not come back yet."""
        return self._stuck

    async def run(self, fn: Callable[[], _T], timeout_s: float | None = None) -> _T:
        """``fn()`` on a daemon thread; its result, or its exception.

        Raises:
            IoTimeout: no answer within ``timeout_s`` (default: the configured deadline), or
                too many calls are stuck already.
        """
        deadline = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        if not self._slots.acquire(blocking=False):
            raise IoTimeout(f"{no_answer(self.timeout_s)} (earlier calls are still stuck)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        state = {"late": False, "finished": False}

        def settle(result: _T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def call() -> None:
            result: _T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the waiting task
                error = exc
            finally:
                with self._lock:
                    state["finished"] = True
                    if state["late"]:
                        self._stuck -= 1
                        log.info("a filesystem call past its deadline came back")
                self._slots.release()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=call, name="fs-call", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline)
        except TimeoutError:
            with self._lock:
                if not state["finished"]:
                    state["late"] = True
                    self._stuck += 1
            log.warning("a filesystem call got no answer in %g s", deadline)
            raise IoTimeout(no_answer(self.timeout_s)) from None
