"""The server's scan workers: long-lived processes that each own one directory at a time.

Each worker is a fresh interpreter (``python -m scanjobs.server.scanworker``) in its own
process group, with its probe processes below it. A directory whose caller is cancelled
(a cancel, a timeout, a shutdown) kills the worker's whole group at once, instead of waiting
for a probe or a commit: an open transaction rolls back, and a cancel's latency does not grow
with the directory. The worker is replaced in the background once it exited, when a directory
waits for a worker or a moment later (so that the replacement's start-up does not compete with
the cancel being published); a killed worker stuck in the kernel (on a share that does not
answer) is not waited for: past ``reap.KILL_WAIT_S`` it is abandoned, logged and counted. A
worker that dies on its own (the OS killed it) costs its directory one error; what it
committed is kept and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import scan_wire as wire
from .errors import DatabaseUnavailable, StorageFault, StorageFull, StorageIOError
from .reap import abandon, exited, stop_in_two_stages
from .spawn import Child, start

__all__ = ["ScanWorkers", "WorkerDied"]

log = logging.getLogger(__name__)

_FAULTS: dict[str, type[StorageFault]] = {
    c.__name__: c for c in (StorageFull, StorageIOError, DatabaseUnavailable)
}
_START_TIMEOUT_S = 60.0
# A killed worker's replacement waits this long, unless a directory waits for a worker: the
# cancel that killed it is still being published, and a new interpreter's start-up (its probe
# processes importing FFmpeg) would take the cores from it.
_RESPAWN_DELAY_S = 0.25


class WorkerDied(Exception):
    """The worker doing a directory died (or answered nonsense) before it was done."""


class _Worker:
    def __init__(self, proc: Child) -> None:
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    async def send(self, message: wire.WorkerSettings | wire.DirectoryTask) -> None:
        self.stdin.write(wire.encode(message))
        await self.stdin.drain()

    async def receive(self) -> wire.Reply:
        (size,) = wire.FRAME.unpack(await self.stdout.readexactly(wire.FRAME.size))
        if size > wire.MAX_FRAME:
            raise wire.BadFrame(f"a reply of {size} bytes")
        return wire.decode_reply(await self.stdout.readexactly(size))

    def kill(self) -> None:
        """Kill the worker and its probe processes (its process group)."""
        if self.proc.returncode is not None:
            return  # reaped: its pid may be another process's now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class ScanWorkers:
    """A fixed number of scan worker processes shared by all jobs.

    Args:
        processes: worker processes (at least 1).
        settings: what each worker is told when it starts.
        command: the worker's command line; by default ``server.scanworker`` run by this
            interpreter.
        on_probe: called with the seconds each file's probe took (metrics).
        on_abandon: called once for each killed worker that did not exit (metrics).
    """

    def __init__(
        self,
        processes: int,
        settings: wire.WorkerSettings,
        *,
        command: Sequence[str] = (sys.executable, "-m", "scanjobs.server.scanworker"),
        on_probe: Callable[[float], None] | None = None,
        on_abandon: Callable[[], None] | None = None,
    ) -> None:
        self._size = max(1, processes)
        self._settings = settings
        self._command = tuple(command)
        self._on_probe = on_probe
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._spawning: set[asyncio.Task[None]] = set()
        self._reaping: set[asyncio.Task[None]] = set()
        self._wanted = asyncio.Event()  # a directory waits for a worker
        self._on_abandon = on_abandon
        self._all: set[_Worker] = set()
        self._closed = False

    @property
    def background_tasks(self) -> int:
        """Replacement spawns, and waits for killed workers to exit, still under way (0 once
        idle or closed)."""
        return len(self._spawning) + len(self._reaping)

    def pids(self) -> list[int]:
        """The worker processes' ids (tests read their children: the probe processes)."""
        return [w.proc.pid for w in self._all if w.proc.returncode is None]

    async def start(self) -> None:
        """Start every worker and wait until each is ready."""
        await asyncio.gather(*(self._spawn() for _ in range(self._size)))

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop every worker in two stages and reap it; idempotent.

        Each worker's input is closed, so that an idle one exits at once (closing its probe
        processes); after ``grace_s`` seconds the ones still running are killed, and logged.
        A killed one that does not exit within ``reap.KILL_WAIT_S`` (stuck in the kernel) is
        abandoned, logged and counted: the server's shutdown never waits on a dead share.
        """
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        stuck = await stop_in_two_stages(list(self._all), grace_s, "scan workers")
        for proc in stuck:
            abandon(proc, "scan worker")
            if self._on_abandon is not None:
                self._on_abandon()
        await asyncio.gather(*self._reaping)
        self._all.clear()

    async def run(self, task: wire.DirectoryTask, on_reply: Callable[[wire.Reply], None]) -> None:
        """Do ``task`` on a worker, passing each reply to ``on_reply`` until it is done.

        Raises:
            StorageFault: the catalog failed (a full disk, a lost database).
            WorkerDied: the worker died before it was done; what it committed is kept.
            RuntimeError: the worker failed unexpectedly (logged by the worker).
        """
        if self._idle.empty():
            self._wanted.set()
        worker = await self._idle.get()
        try:
            reply = await self._exchange(worker, task, on_reply)
        except asyncio.CancelledError:
            self._replace(worker)  # do not wait for its probe or commit
            raise
        except (asyncio.IncompleteReadError, ConnectionError, wire.BadFrame) as exc:
            self._replace(worker)
            log.warning("a scan worker died mid-directory: %s", exc)
            raise WorkerDied(
                "the scan worker doing this folder died; what it committed is kept"
            ) from None
        if isinstance(reply, wire.Done) and reply.retire:
            # A filesystem call of its own is stuck in the kernel: it gets no more work.
            log.warning("replacing a scan worker with a filesystem call stuck past its deadline")
            self._replace(worker)
        elif isinstance(reply, wire.Fault):
            # Its connection may be broken for good (a database that went away): a fresh
            # worker connects afresh once the database answers again.
            self._replace(worker)
        else:
            self._idle.put_nowait(worker)
        if isinstance(reply, wire.Fault):
            fault = _FAULTS.get(reply.kind)
            raise fault(reply.message) if fault else RuntimeError(reply.message)

    async def _exchange(
        self, worker: _Worker, task: wire.DirectoryTask, on_reply: Callable[[wire.Reply], None]
    ) -> wire.Reply:
        await worker.send(task)
        while True:
            reply = await worker.receive()
            if isinstance(reply, wire.Done | wire.Fault):
                return reply
            if isinstance(reply, wire.Committed) and self._on_probe is not None:
                for seconds in reply.probe_s:
                    self._on_probe(seconds)
            on_reply(reply)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._all.discard(worker)
        reaping = asyncio.create_task(self._reap(worker))
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)
        if self._closed:
            return
        task = asyncio.create_task(self._respawn(reaping))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _reap(self, dead: _Worker) -> None:
        """Wait (bounded) for a killed worker to exit; abandon it if it does not."""
        if not await exited(dead.proc):
            abandon(dead.proc, "scan worker")
            if self._on_abandon is not None:
                self._on_abandon()

    async def _respawn(self, reaping: asyncio.Task[None]) -> None:
        """Start a replacement once the killed worker exited, or was abandoned (within a
        second), and then only once a directory waits for it or after ``_RESPAWN_DELAY_S``: a
        new interpreter's start-up must not compete with the cancel that killed its
        predecessor, and nothing waits on a worker the kernel holds."""
        await asyncio.shield(reaping)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wanted.wait(), _RESPAWN_DELAY_S)
        self._wanted.clear()
        while True:
            try:
                await self._spawn()
                return
            except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.error("cannot start a scan worker; trying again: %s", exc)
                await asyncio.sleep(1.0)

    async def _spawn(self) -> None:
        proc = await start(
            self._command,
            start_new_session=True,  # its own group: killed with its probe processes
            limit=wire.MAX_FRAME,
        )
        worker = _Worker(proc)
        self._all.add(worker)
        if self._closed:
            worker.kill()
            return
        try:
            await worker.send(self._settings)
            ready = await asyncio.wait_for(worker.receive(), _START_TIMEOUT_S)
        except BaseException:
            worker.kill()
            raise
        if not isinstance(ready, wire.Ready):
            worker.kill()
            raise RuntimeError(f"a scan worker did not start: {ready}")
        self._idle.put_nowait(worker)
