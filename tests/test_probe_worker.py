"""A probe worker process: outcomes written together, files probed on threads only while
they wait on storage."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import pytest

from scanjobs.server import probe as probe_module
from scanjobs.server import probe_wire as wire
from scanjobs.server import probe_worker
from scanjobs.server.probe import ProbeFailure, ProbeOutcome, ProbeTarget


def test_outcomes_that_are_ready_go_out_in_one_write() -> None:
    first_may_finish, all_submitted = threading.Event(), threading.Event()
    submitted: list[Future[ProbeOutcome]] = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            submitted.append(super().submit(fn, *args, **kwargs))
            if len(submitted) == 3:
                all_submitted.set()
            return submitted[-1]

    def fake_probe(t: ProbeTarget) -> ProbeFailure:
        if t.relative == b"0":
            first_may_finish.wait(timeout=30)
        return ProbeFailure(t.relative.decode())

    def release_the_first_once_the_others_are_done() -> None:
        all_submitted.wait(timeout=30)
        wait(submitted[1:])
        first_may_finish.set()

    class Out:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> int:
            self.writes.append(bytes(data))
            return len(data)

        def flush(self) -> None:
            pass

    out = Out()
    outbox = probe_worker._Outbox(out, delay_s=3600)  # type: ignore[arg-type]
    targets = [ProbeTarget(b"/", str(i).encode(), 0, 0) for i in range(3)]
    releaser = threading.Thread(target=release_the_first_once_the_others_are_done)
    releaser.start()
    with Recording(4) as pool:
        probe_worker._probe_on(pool, fake_probe, targets, outbox)
    releaser.join()
    outbox.flush()
    outbox.close()
    assert len(out.writes) == 1
    assert _outcomes(out.writes[0]) == [ProbeFailure(m) for m in "012"]


def _outcomes(data: bytes) -> list[ProbeOutcome]:
    """The outcomes in what a worker wrote."""
    outcomes = []
    while data:
        (size,) = wire.FRAME.unpack_from(data)
        outcomes.append(wire.decode_outcome(data[wire.FRAME.size : wire.FRAME.size + size]))
        data = data[wire.FRAME.size + size :]
    return outcomes


class _Pipe:
    """A worker's stdout that records each write, and tells when one happened."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.written = threading.Event()

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        self.written.set()
        return len(data)

    def flush(self) -> None:
        pass


def test_a_worker_writes_the_outcomes_it_has_together() -> None:
    pipe = _Pipe()
    outbox = probe_worker._Outbox(pipe, delay_s=3600)  # type: ignore[arg-type]
    for frame in (b"a", b"b", b"c"):
        outbox.put(frame)
    assert pipe.writes == []  # not one write per file
    outbox.flush()
    outbox.close()
    assert pipe.writes == [b"abc"]


def test_an_outcome_goes_out_shortly_even_while_the_next_file_takes_long() -> None:
    pipe = _Pipe()
    outbox = probe_worker._Outbox(pipe, delay_s=0.01)  # type: ignore[arg-type]
    outbox.put(b"done")  # ... and the worker is now stuck on its next file
    assert pipe.written.wait(timeout=30)
    outbox.close()
    assert pipe.writes == [b"done"]


def _serve_batches(
    monkeypatch: pytest.MonkeyPatch,
    batches: list[list[ProbeTarget]],
    probe: object,
    threads: int = 4,
) -> list[ProbeOutcome]:
    """Run a worker's main loop over ``batches`` in this process; its outcomes, in order."""
    monkeypatch.setenv(probe_module.THREADS_VARIABLE, str(threads))
    monkeypatch.delenv(probe_module.MEMORY_VARIABLE, raising=False)
    stdin = io.BytesIO(b"".join(wire.encode_targets(tuple(b)) for b in batches))
    stdout = io.BytesIO()
    probe_worker.serve(stdin, stdout, probe)  # type: ignore[arg-type]
    return _outcomes(stdout.getvalue())


def _spin(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_files_that_do_not_wait_on_storage_are_probed_on_the_worker_s_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: set[str] = set()

    def computes(t: ProbeTarget) -> ProbeOutcome:
        threads.add(threading.current_thread().name)
        _spin(0.002)  # busy, never blocked
        return ProbeFailure(t.relative.decode())

    # The judgement itself is tested below with waits the test controls. Here a hiccup of
    # the test process (another of its threads holding Python's lock while a CPU hog runs)
    # must not count as a file that waited.
    monkeypatch.setattr(probe_worker._Storage, "BLOCKED_S", 3600.0)
    targets = [ProbeTarget(b"/", str(i).encode(), 0, 0) for i in range(20)]
    outcomes = _serve_batches(monkeypatch, [targets[:10], targets[10:]], computes)

    assert outcomes == [ProbeFailure(str(i)) for i in range(20)]
    assert threads == {threading.current_thread().name}


def test_files_that_wait_on_storage_move_the_rest_of_the_batch_to_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at_once, most = 0, 0
    lock = threading.Lock()

    def waits(t: ProbeTarget) -> ProbeOutcome:
        nonlocal at_once, most
        with lock:
            at_once += 1
            most = max(most, at_once)
        time.sleep(0.02)  # blocked, as on a slow share
        with lock:
            at_once -= 1
        return ProbeFailure(t.relative.decode())

    targets = [ProbeTarget(b"/", str(i).encode(), 0, 0) for i in range(12)]
    outcomes = _serve_batches(monkeypatch, [targets], waits)

    assert outcomes == [ProbeFailure(str(i)) for i in range(12)]  # still in order
    assert most == 4  # after two files, the rest of the batch went to the four threads


def test_a_worker_on_threads_tries_one_file_on_its_own_again_after_a_while() -> None:
    storage = probe_worker._Storage()
    blocked = ProbeTarget(b"/", b"slow", 0, 0)
    storage.probe(lambda t: (time.sleep(0.005), ProbeFailure(""))[1], blocked)
    assert not storage.slow  # one file alone may have waited for Python's lock
    storage.probe(lambda t: (time.sleep(0.005), ProbeFailure(""))[1], blocked)
    assert storage.slow and not storage.due()
    storage._tested -= probe_worker._Storage.RETEST_S  # a second later
    assert storage.due()
    storage.BLOCKED_S = 3600.0  # cached by now: this file does not wait, whatever the machine
    storage.probe(lambda t: (_spin(0.005), ProbeFailure(""))[1], blocked)
    assert not storage.slow and storage.due()
