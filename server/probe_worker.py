"""A probe worker process: batches of files in on stdin, one outcome per file out on stdout.

Run as ``python -m scanjobs.server.probe_worker`` by :class:`scanjobs.server.probe.ProbePool`,
which documents the pipes; the wire format is in :mod:`scanjobs.server.probe_wire`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from . import probe_wire as wire
from .media import ProbeOutcome, ProbeTarget
from .probe import MEMORY_VARIABLE, THREADS_VARIABLE, probe_file

__all__ = ["serve"]

# Threads in a worker: each gets a small stack, and glibc two malloc arenas in all (not 64 MiB
# of address space per thread), so that many files in flight fit the --probe-memory limit.
_THREAD_STACK_BYTES = 2 * 2**20


def _probe_on(
    pool: ThreadPoolExecutor,
    probe: Callable[[ProbeTarget], ProbeOutcome],
    targets: Sequence[ProbeTarget],
    outbox: _Outbox,
) -> None:
    """Probe ``targets`` on ``pool``, their outcomes to ``outbox`` in order: each as soon as
    it and those before it are done, those that are ready together in one write."""
    pending = collections.deque(pool.submit(_timed, probe, target) for target in targets)
    while pending:
        if not pending[0].done():
            outbox.flush()  # what is done goes out before the worker waits
        outbox.put(wire.encode_outcome(*pending.popleft().result()))


def _timed(
    probe: Callable[[ProbeTarget], ProbeOutcome], target: ProbeTarget
) -> tuple[ProbeOutcome, float]:
    started = time.monotonic()
    return probe(target), time.monotonic() - started


class _Outbox:
    """Outcomes on their way to the pool, written together.

    One write per file woke the scan worker for every file, which cost it a third of its
    CPU on small files. A thread writes what is waiting ``DELAY_S`` after the first of it
    was put: a file that then hangs does not hold back the outcomes before it (the pool
    blames the first file without an outcome), and progress stays live.
    """

    DELAY_S = 0.005

    def __init__(self, out: BinaryIO, delay_s: float | None = None) -> None:
        self._out = out
        self._delay_s = self.DELAY_S if delay_s is None else delay_s
        self._pending: list[bytes] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> None:
        with self._changed:
            self._pending.append(frame)
            if len(self._pending) == 1:
                self._changed.notify()

    def flush(self) -> None:
        with self._changed:
            self._write()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _write(self) -> None:
        if self._pending:
            self._out.write(b"".join(self._pending))
            self._out.flush()
            self._pending.clear()

    def _run(self) -> None:
        with contextlib.suppress(BrokenPipeError), self._changed:  # gone: stdin ends too
            while True:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._closed:
                    self._changed.wait(self._delay_s)  # others join the first meanwhile
                if self._closed:
                    return
                self._write()


class _Storage:
    """Whether a worker's files wait on storage, judged from the files it probes itself.

    Threads pay only while probes wait on I/O: on files that are in memory, sixteen threads
    contending for the GIL cost a worker more than twice the CPU per file that one thread
    does. So a worker probes its files one at a time, on its own thread, and moves the rest of
    the batch to its threads once two files in a row spent most of their time blocked (a
    voluntary context switch, not the scheduler's preemption; one alone may have waited for
    Python's lock). While on threads it tries one file on its own again every ``RETEST_S``
    seconds, so a library that is now cached goes back to one thread.
    """

    BLOCKED_S = 0.001  # a file that waited this long, and longer than it computed, waited
    RETEST_S = 1.0

    def __init__(self) -> None:
        self.slow = False
        self._tested = 0.0
        self._waited = 0  # files in a row that waited

    def due(self) -> bool:
        """True if the next file should be probed on this thread (and measured)."""
        return not self.slow or time.monotonic() - self._tested >= self.RETEST_S

    def probe(
        self, probe: Callable[[ProbeTarget], ProbeOutcome], target: ProbeTarget
    ) -> tuple[ProbeOutcome, float]:
        """``probe(target)`` on this thread, and its seconds; records whether the file
        waited on storage."""
        switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        started, cpu = time.monotonic(), time.thread_time()
        outcome = probe(target)
        ended = time.monotonic()
        waited = (ended - started) - (time.thread_time() - cpu)
        blocked = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw > switches
        if blocked and waited >= max(self.BLOCKED_S, ended - started - waited):
            self._waited += 1
        else:
            self._waited = 0
        self.slow, self._tested = self._waited >= 2, ended
        return outcome, ended - started


def serve(
    stdin: BinaryIO,
    stdout: BinaryIO,
    probe: Callable[[ProbeTarget], ProbeOutcome] = probe_file,
) -> None:
    """Worker main loop: read batches, write one framed outcome per file.

    The address-space limit the pool passed (``SCANJOBS_PROBE_MEMORY``, MiB) is set first,
    before FFmpeg is loaded and before any file is read.
    """
    memory_bytes = int(os.environ.get(MEMORY_VARIABLE) or 0) * 2**20
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    threads = max(1, int(os.environ.get(THREADS_VARIABLE) or 1))
    import av

    av.logging.set_level(None)
    threading.stack_size(_THREAD_STACK_BYTES)
    pool, storage, outbox = None, _Storage(), _Outbox(stdout)
    if threads > 1:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="probe")
    while True:
        header = stdin.read(wire.FRAME.size)
        if len(header) < wire.FRAME.size:
            outbox.close()
            return  # the server closed our stdin or died
        (size,) = wire.FRAME.unpack(header)
        targets = wire.decode_targets(stdin.read(size))
        done = 0
        while done < len(targets) and (pool is None or storage.due()):
            outbox.put(wire.encode_outcome(*storage.probe(probe, targets[done])))
            done += 1
        if pool is not None and done < len(targets):
            _probe_on(pool, probe, targets[done:], outbox)
        outbox.flush()  # the batch is done: the pool waits for nothing else


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        serve(sys.stdin.buffer, sys.stdout.buffer)
