"""Reaping killed processes without waiting for ever on one the kernel holds.

A process blocked in the kernel on a share that stopped answering (uninterruptible sleep, state
``D``) does not exit when killed: it exits when the share answers, which may be never. Waiting
for it would hold up a replacement or a shutdown. :func:`exited` bounds that wait; a process
still there after it is abandoned: logged with its pid, and left to the kernel (the child
watcher reaps it whenever it does exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from .spawn import Child

__all__ = ["KILL_WAIT_S", "abandon", "exited", "stop_in_two_stages"]

log = logging.getLogger(__name__)

KILL_WAIT_S = 1.0  # a killed process exits in milliseconds unless the kernel holds it


class Stoppable(Protocol):
    """A worker process with its input pipe."""

    @property
    def proc(self) -> Child: ...

    @property
    def stdin(self) -> asyncio.StreamWriter: ...

    def kill(self) -> None: ...


async def stop_in_two_stages(
    workers: Sequence[Stoppable], grace_s: float, what: str
) -> list[Child]:
    """Close each worker's input, so that an idle one exits at once; after ``grace_s``
    seconds kill (and log) the ones still running, and wait (bounded) for them to exit.

    Returns the killed ones that did not exit: stuck in the kernel, to be abandoned.
    """
    for worker in workers:
        worker.stdin.close()
    exits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
    if exits:
        await asyncio.wait(exits, timeout=grace_s)
    for pending in exits:
        pending.cancel()
    stubborn = [w for w in workers if w.proc.returncode is None]
    if stubborn:
        log.warning(
            "killed %s still running after the grace period",
            what,
            extra={"pids": [w.proc.pid for w in stubborn]},
        )
    for worker in stubborn:
        worker.kill()
    gone = await asyncio.gather(*(exited(w.proc) for w in stubborn))
    return [w.proc for w, out in zip(stubborn, gone, strict=True) if not out]


async def exited(proc: Child, wait_s: float = KILL_WAIT_S) -> bool:
    """Wait up to ``wait_s`` seconds for ``proc`` to exit; True if it did."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), wait_s)
    return proc.returncode is not None


def abandon(proc: Child, what: str) -> None:
    """Log that ``proc`` (a ``what``), killed, did not exit: it is left behind, its pipes
    closed (it is still reaped whenever it exits)."""
    proc.abandon()
    log.warning(
        "abandoned a %s that does not exit after being killed (stuck in the kernel, on a "
        "share that does not answer?)",
        what,
        extra={"pid": proc.pid},
    )
