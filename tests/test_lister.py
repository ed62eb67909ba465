"""Listings on a scan worker's own thread, and the watchdog that answers for a stuck one."""

from __future__ import annotations

import asyncio
import io
import os
import select
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from scanjobs.server import scan_wire as wire
from scanjobs.server import scanworker
from scanjobs.server.catalog_memory import InMemoryCatalog
from scanjobs.server.deadline import no_answer
from scanjobs.server.errors import IoTimeout
from scanjobs.server.lister import Lister
from scanjobs.server.probe import ProbeOutcome, ProbeTarget
from scanjobs.server.roots import RootPolicy
from scanjobs.server.walk import Listing, Tree

VIDEO_EXTS = frozenset({b".mp4"})
TIMEOUT_S = 0.1


class GatedTree(Tree):
    """A tree whose listing of ``gated`` waits for ``gate``."""

    def __init__(self, root: Path, gated: bytes = b"-") -> None:
        policy = RootPolicy([str(root)])
        super().__init__(policy.locate(str(root)), VIDEO_EXTS, policy)
        self.gated = gated
        self.gate = threading.Event()

    def list(self, relative: bytes = b"") -> Listing:
        if relative == self.gated:
            self.gate.wait()
        return super().list(relative)


class ProgressingTree(GatedTree):
    """A tree whose gated listing answers a call each time the watchdog looks at it, and
    ends once the watchdog looked ``looks`` times (over several timeouts)."""

    def __init__(self, root: Path, gated: bytes, looks: int) -> None:
        self._ops, self._looks_left = 0, looks
        super().__init__(root, gated)

    @property  # type: ignore[override]
    def ops(self) -> int:
        if threading.current_thread().name == "fs-watchdog":
            self._ops += 1
            self._looks_left -= 1
            if self._looks_left <= 0:
                self.gate.set()
        return self._ops

    @ops.setter
    def ops(self, value: int) -> None:
        self._ops = value


def _library(root: Path, folders: int) -> list[bytes]:
    names = []
    for n in range(folders):
        (root / f"d{n:02}").mkdir(parents=True)
        (root / f"d{n:02}" / "v.mp4").write_bytes(b"x" * (n + 1))
        names.append(f"d{n:02}".encode())
    return names


def _list(lister: Lister, tree: Tree, name: bytes) -> Listing:
    return lister.call(tree, tree.path_of(name), partial(tree.list, name))


def test_listings_that_answer_are_returned_in_order_and_nothing_is_given_up(
    tmp_path: Path,
) -> None:
    names = _library(tmp_path, 3)
    tree, stuck = GatedTree(tmp_path), []
    lister = Lister(10.0, stuck.append)
    with lister.watching(), tree:
        got = [_list(lister, tree, n) for n in names]
    assert [g.path for g in got] == [bytes(tmp_path) + b"/" + n for n in names]
    assert [g.files[0].size_bytes for g in got] == [1, 2, 3]
    assert stuck == []


def test_a_listing_that_never_answers_is_answered_for_while_its_thread_is_stuck(
    tmp_path: Path,
) -> None:
    names = _library(tmp_path, 2)
    tree = GatedTree(tmp_path, gated=names[1])
    answered, stuck = threading.Event(), []
    lister = Lister(TIMEOUT_S, lambda path: (stuck.append(path), answered.set()))
    outcome: list[object] = []

    def loop_thread() -> None:
        with lister.watching(), tree:
            outcome.append(_list(lister, tree, names[0]).path)
            try:
                _list(lister, tree, names[1])
            except IoTimeout as exc:
                outcome.append(exc)

    thread = threading.Thread(target=loop_thread)
    thread.start()
    try:
        assert answered.wait(10)
        assert thread.is_alive()  # the answer came while the listing was still stuck
        assert stuck == [tree.path_of(names[1])]
    finally:
        tree.gate.set()
        thread.join(10)
    # The listing that answered too late is dropped: its caller gets the timeout.
    assert outcome[0] == tree.path_of(names[0])
    assert isinstance(outcome[1], IoTimeout)


def test_a_slow_listing_that_keeps_making_progress_is_never_given_up(tmp_path: Path) -> None:
    names = _library(tmp_path, 1)
    tree, stuck = ProgressingTree(tmp_path, names[0], looks=12), []  # three timeouts' worth
    lister = Lister(TIMEOUT_S, stuck.append)
    with lister.watching(), tree:
        listing = _list(lister, tree, names[0])
    assert listing.complete
    assert stuck == []


def test_a_scan_folder_that_cannot_be_opened_raises_its_own_error(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    tree = GatedTree(tmp_path / "lib")
    (tmp_path / "lib").rmdir()
    lister = Lister(10.0, lambda path: None)
    with lister.watching(), pytest.raises(FileNotFoundError):
        lister.call(tree, b"/lib", tree.__enter__)


# -- the worker: the watchdog's answer reaches the server ---------------------------------------


class _NoProbes:
    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        raise AssertionError("nothing to probe here")


def _read_frames(fd: int, count: int) -> list[wire.Reply]:
    """``count`` replies read from the pipe ``fd``."""
    with os.fdopen(os.dup(fd), "rb", buffering=0) as pipe:
        replies = []
        for _ in range(count):
            (size,) = wire.FRAME.unpack(_exactly(pipe, wire.FRAME.size))
            replies.append(wire.decode_reply(_exactly(pipe, size)))
        return replies


def _exactly(pipe: object, size: int) -> bytes:
    data = b""
    while len(data) < size:
        assert select.select([pipe], [], [], 10)[0], "no reply in 10 s"
        chunk = pipe.read(size - len(data))  # type: ignore[attr-defined]
        assert chunk, "the worker stopped writing"
        data += chunk
    return data


def test_a_worker_stuck_in_a_listing_sends_its_error_and_asks_to_be_replaced_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _library(tmp_path, 3)
    gate = threading.Event()

    class StuckTree(Tree):
        def list(self, relative: bytes = b"") -> Listing:
            if relative == names[1]:
                gate.wait()
            return super().list(relative)

    monkeypatch.setattr(scanworker, "Tree", StuckTree)
    roots = RootPolicy([str(tmp_path)])
    settings = wire.WorkerSettings(
        database="", roots=(str(tmp_path),), resolutions=(str(tmp_path),),
        extensions=(".txt",), seen_resolution_ns=10**9, chunk=128, probe_batch=16,
        probe_command=(), io_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    replies = scanworker._Replies(out)
    work = scanworker.DirectoryWork(
        InMemoryCatalog(), _NoProbes(), roots, settings, on_stuck=replies.answer_for_stuck
    )
    task = wire.DirectoryTask("job", 0, False, False, roots.locate(str(tmp_path)), tuple(names))
    finished: list[bool] = []
    thread = threading.Thread(
        target=lambda: finished.append(asyncio.run(work.run(task, replies.emit)))
    )
    thread.start()
    try:
        got = _read_frames(read_end, 4)
        assert thread.is_alive()  # all of it sent while the worker's thread is stuck
    finally:
        gate.set()
        thread.join(10)
    out.close()
    rest = b"".join(iter(partial(os.read, read_end, 65536), b""))
    os.close(read_end)

    path = bytes(tmp_path) + b"/" + names[1]
    assert [type(r) for r in got] == [wire.Listed, wire.Committed, wire.Listed, wire.Done]
    assert got[2] == wire.Listed(0, (), (path, no_answer(TIMEOUT_S)))
    assert got[3] == wire.Done(retire=True)
    assert finished == [False]
    assert rest == b""  # nothing once it was answered for: not the late listing, not d02


def test_a_lone_folder_sends_its_sub_folders_before_it_is_reconciled(tmp_path: Path) -> None:
    # The other lanes may be waiting for those sub-folders: a task of one folder sends its
    # listing at once; a task of several sends its replies together.
    names = _library(tmp_path / "lib", 2)
    roots = RootPolicy([str(tmp_path)])
    settings = wire.WorkerSettings(
        database="", roots=(str(tmp_path),), resolutions=(str(tmp_path),),
        extensions=(".txt",), seen_resolution_ns=10**9, chunk=128, probe_batch=16,
        probe_command=(),
    )  # fmt: skip
    emitted: list[wire.Reply] = []
    flushed: list[list[wire.Reply]] = []
    work = scanworker.DirectoryWork(
        InMemoryCatalog(), _NoProbes(), roots, settings, flush=lambda: flushed.append(emitted[:])
    )
    folder = roots.locate(str(tmp_path))

    def run(directories: tuple[bytes, ...]) -> None:
        task = wire.DirectoryTask("job", 0, False, True, folder, directories)
        asyncio.run(work.run(task, emitted.append))

    run((b"",))
    assert flushed == [[wire.Listed(0, (b"lib",))]]  # before its commit was reported
    assert [type(r) for r in emitted] == [wire.Listed, wire.Committed]
    flushed.clear()
    run((b"lib", *(b"lib/" + n for n in names)))
    assert flushed == []


def test_a_worker_sends_its_replies_every_64() -> None:
    out = io.BytesIO()
    replies = scanworker._Replies(out)
    for _ in range(63):
        replies.emit(wire.Done())
    assert out.getvalue() == b""
    replies.emit(wire.Done())
    assert out.getvalue() == wire.encode(wire.Done()) * 64
