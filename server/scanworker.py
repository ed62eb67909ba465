"""The scan worker: a process that owns directories of scan jobs end to end.

::

    server (coordinator) --DirectoryTask--> scan worker: list the directory by descriptor,
        read its catalog rows, compare, probe what changed (in its probe child, a sandbox),
        commit rows and counts on its own database connection --Listed, Committed..., Done-->

The server never touches a file: it hands out directories and gets small summaries back, so
the per-file work of a scan runs in as many processes as there are workers, off the server's
event loop. What a worker commits carries the counts it makes, in the same transaction, so a
worker killed mid-directory (a cancel, the OS) loses only what it had not committed, and what
the job reports is read back from what was.

The worker holds a database connection but never parses a media file: FFmpeg runs in its
probe processes (``server.probe``), which get a clean environment, an address-space limit and
optionally another user, and answer in fixed structs. Run as
``python -m scanjobs.server.scanworker``; :class:`DirectoryWork` is the same work in-process,
for tests with a test double of the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO, TypeVar

from . import logs
from . import scan_wire as wire
from .catalog import Catalog, ScanCounts
from .deadline import no_answer
from .errors import IoTimeout, StorageFault
from .lister import Lister
from .probe import ProbeOutcome, ProbePool, Prober, ProbeTarget
from .reconcile import DirectoryScan, Reported
from .roots import RootPolicy
from .walk import Tree

__all__ = ["DirectoryWork", "LocalDirectories"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

Emit = Callable[[wire.Reply], None]
_FLUSH_AT = 64  # replies (a rescan's settled folder makes two)


class DirectoryWork:
    """Lists, reconciles and commits one directory at a time, telling ``emit`` as it goes.

    Args:
        catalog: where rows live (this process's own connection).
        prober: probes changed files.
        roots: the allowed roots.
        settings: the tunables (``extensions``, ``seen_resolution_ns``, ``chunk``,
            ``probe_batch``).
        probe_times: where the prober appends each file's seconds, reported with commits.
        on_stuck: given the error of a directory whose listing got no answer within
            ``--io-timeout``, on another thread, while this one is stuck in that listing: the
            worker process sends it, and asks to be replaced, from there.
        flush: sends the replies emitted so far; called when a task of one directory found
            sub-folders (the other lanes may be waiting for them while this one reconciles).
    """

    def __init__(
        self,
        catalog: Catalog,
        prober: Prober,
        roots: RootPolicy,
        settings: wire.WorkerSettings,
        probe_times: list[float] | None = None,
        on_stuck: Emit | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._flush = flush
        self._prober = prober
        self._roots = roots
        self._settings = settings
        self._extensions = frozenset(os.fsencode(e.lower()) for e in settings.extensions)
        self._probe_times = probe_times if probe_times is not None else []
        self._on_stuck = on_stuck
        self._lister = Lister(settings.io_timeout_s, self._stuck)
        self._stats = (
            ThreadPoolExecutor(settings.io_concurrency, thread_name_prefix="stat")
            if settings.io_concurrency > 1
            else None
        )

    async def run(self, task: wire.DirectoryTask, emit: Emit) -> bool:
        """Do ``task``'s directories in order: for each, emits
        :class:`~server.scan_wire.Listed` once, then one :class:`~server.scan_wire.Committed`
        per commit. Domain faults (a full disk, a lost database) are raised.

        Returns False when a listing got no answer within ``--io-timeout``: that directory
        is an error, the ones after it are left undone, and a thread of this process is
        stuck in the kernel (the process should be replaced).
        """
        tree = Tree(task.folder, self._extensions, self._roots, stats=self._stats)
        first = tree.path_of(task.directories[0]) if task.directories else task.folder.path
        with self._lister.watching():
            try:
                self._lister.call(tree, first, tree.__enter__)
            except IoTimeout:
                emit(self._no_answer(first))
                return False
            try:
                return await self._directories(task, tree, emit)
            finally:
                tree.__exit__()

    async def _directories(self, task: wire.DirectoryTask, tree: Tree, emit: Emit) -> bool:
        s, offset = self._settings, task.clock_offset_ns
        scan = DirectoryScan(
            self._catalog, self._prober, task.job_id, task.since_ns, task.reprobe,
            task.recursive, self._roots, lambda: time.time_ns() + offset,
            s.seen_resolution_ns, s.chunk, s.probe_batch,
            self._reporter(emit, _Wanted(task.errors_wanted)), s.io_timeout_s,
        )  # fmt: skip
        for directory in task.directories:
            path = tree.path_of(directory)
            try:
                listing = self._lister.call(tree, path, partial(tree.list, directory))
            except IoTimeout:
                emit(self._no_answer(path))
                return False
            error, folders = listing.error, tuple(listing.folders) if task.recursive else ()
            emit(
                wire.Listed(
                    len(listing.entry_items()),
                    folders,
                    None if error is None else (error.path, error.message),
                )
            )
            if folders and len(task.directories) == 1 and self._flush is not None:
                self._flush()
            await scan(listing)
        return True

    def _no_answer(self, path: bytes) -> wire.Listed:
        return wire.Listed(0, (), (path, no_answer(self._settings.io_timeout_s)))

    def _stuck(self, path: bytes) -> None:
        if self._on_stuck is not None:
            self._on_stuck(self._no_answer(path))

    def _reporter(self, emit: Emit, wanted: _Wanted) -> Reported:
        times = self._probe_times

        def report(
            counts: ScanCounts, errors: Sequence[tuple[bytes, str]], current: bytes, written: bool
        ) -> None:
            probed = tuple(times)
            times.clear()
            sent = wanted.take(errors)
            dropped = len(errors) - len(sent)
            emit(wire.Committed(counts, sent, current, written, probed, dropped))

        return report


class _Wanted:
    """How many more per-file errors a task's job keeps: a rescan of a library with many
    remembered failures sends their count, not every one of them every time."""

    def __init__(self, errors: int) -> None:
        self._left = errors

    def take(self, errors: Sequence[tuple[bytes, str]]) -> tuple[tuple[bytes, str], ...]:
        """The first of ``errors`` that the job keeps."""
        sent = tuple(errors[: max(self._left, 0)])
        self._left -= len(sent)
        return sent


class LocalDirectories:
    """Directories done in this process, one :class:`DirectoryWork` each at a time: what
    ``server.scan.Scanner`` runs on in tests with test doubles (the server itself uses
    ``server.scanpool.ScanWorkers``)."""

    def __init__(self, work: DirectoryWork) -> None:
        self._work = work

    async def run(self, task: wire.DirectoryTask, on_reply: Emit) -> None:
        await self._work.run(task, on_reply)  # a stuck listing: nothing to replace here


# -- the worker process --------------------------------------------------------------------


async def _open_catalog(database: str) -> tuple[Catalog, Callable[[], Awaitable[None]]]:
    if database.startswith(("postgresql://", "postgres://")):
        from .pgstore import PgCatalog, PgDatabase

        pg = await PgDatabase.attach(database)
        return PgCatalog(pg), pg.close
    from pathlib import Path

    from .store import Database, SqliteCatalog

    db = await Database.attach(Path(database))
    return SqliteCatalog(db), db.close


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        (size,) = wire.FRAME.unpack(await reader.readexactly(wire.FRAME.size))
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None  # the server closed our stdin, or died


class _Replies:
    """Replies on their way to the server, written together: before the worker waits for a
    probe (the server hands out the sub-folders meanwhile), every ``_FLUSH_AT`` replies (the
    server takes them in while the worker goes on, not all at once after the task) and at
    the end of a task.

    :meth:`answer_for_stuck` writes the last ones from the watchdog's thread while the
    worker's own thread is stuck in a listing; nothing is written after them.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pending: list[bytes] = []
        self.closed = False

    def emit(self, reply: wire.Reply) -> None:
        if not self.closed:
            self._pending.append(wire.encode(reply))
            if len(self._pending) >= _FLUSH_AT:
                self.flush()

    def flush(self) -> None:
        if self._pending and not self.closed:
            self._out.write(b"".join(self._pending))
            self._out.flush()
            self._pending.clear()

    def answer_for_stuck(self, error: wire.Reply) -> None:
        """The replies so far, then ``error`` (the stuck directory's) and a request to be
        replaced: the directories after it go to another worker."""
        self.emit(error)
        self.emit(wire.Done(retire=True))
        self.flush()
        self.closed = True


class _Flushing:
    """A prober that sends the replies so far before it probes."""

    def __init__(self, prober: Prober, replies: _Replies) -> None:
        self._prober = prober
        self._replies = replies

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        self._replies.flush()
        return await self._prober.probe(targets)


async def _serve(reader: asyncio.StreamReader, out: BinaryIO) -> None:
    replies = _Replies(out)
    hello = await _read_frame(reader)
    if hello is None:
        return
    settings = wire.decode_settings(hello)
    catalog, close_db = await _open_catalog(settings.database)
    times: list[float] = []
    probes = ProbePool(
        settings.probe_processes,
        settings.probe_timeout_s,
        command=settings.probe_command,
        on_probe=times.append,
        memory_mib=settings.probe_memory_mib,
        user=settings.probe_user,
        threads=settings.io_concurrency,
    )
    await probes.start()
    roots = RootPolicy(settings.roots, settings.resolutions)
    prober = _Flushing(probes, replies)
    work = DirectoryWork(
        catalog, prober, roots, settings, times, replies.answer_for_stuck, replies.flush
    )
    replies.emit(wire.Ready())
    replies.flush()
    try:
        while not replies.closed and (payload := await _read_frame(reader)) is not None:
            task = wire.decode_task(payload)
            with logs.bound_job(task.job_id):
                replies.emit(await _run(work, task, replies.emit))
            replies.flush()
    finally:
        await probes.close()
        await catalog.close()
        await close_db()


async def _run(work: DirectoryWork, task: wire.DirectoryTask, emit: Emit) -> wire.Reply:
    try:
        finished = await work.run(task, emit)
    except StorageFault as exc:
        return wire.Fault(type(exc).__name__, str(exc))
    except Exception:
        log.exception("a directory failed in a scan worker")
        return wire.Fault("internal", "a scan worker failed; see the server log")
    return wire.Done(retire=not finished)


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=wire.MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await _serve(reader, sys.stdout.buffer)


if __name__ == "__main__":
    logs.configure(os.environ.get("SCANJOBS_WORKER_LOG_LEVEL", "WARNING"))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        asyncio.run(_main())
