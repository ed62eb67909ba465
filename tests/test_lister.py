"""Listings made ahead on a scan worker's filesystem thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from scanjobs.server import lister
from scanjobs.server.errors import IoTimeout
from scanjobs.server.lister import FsThread, Listings
from scanjobs.server.roots import RootPolicy
from scanjobs.server.walk import Listing, Tree

VIDEO_EXTS = frozenset({b".mp4"})


class GatedTree(Tree):
    """A tree that records what it lists, and whose listing of ``gated`` waits for ``gate``."""

    def __init__(self, root: Path, gated: bytes = b"") -> None:
        policy = RootPolicy([str(root)])
        super().__init__(policy.locate(str(root)), VIDEO_EXTS, policy)
        self.gated = gated
        self.gate = threading.Event()
        self.listed: list[bytes] = []
        self.all_listed = threading.Event()
        self.expected = -1

    def list(self, relative: bytes = b"") -> Listing:
        if relative == self.gated:
            self.gate.wait()
        listing = super().list(relative)
        self.listed.append(relative)
        if len(self.listed) == self.expected:
            self.all_listed.set()
        return listing


def _library(root: Path, folders: int) -> list[bytes]:
    names = []
    for n in range(folders):
        (root / f"d{n:02}").mkdir(parents=True)
        (root / f"d{n:02}" / "v.mp4").write_bytes(b"x" * (n + 1))
        names.append(f"d{n:02}".encode())
    return names


async def _flushed(fs: FsThread) -> None:
    """Wait until the calls submitted to ``fs`` before this one have returned."""
    done = threading.Event()
    fs.submit(done.set)
    assert await asyncio.to_thread(done.wait, 10)


async def test_the_thread_lists_a_task_ahead_and_hands_the_listings_over_in_order(
    tmp_path: Path,
) -> None:
    names = _library(tmp_path, 5)
    tree = GatedTree(tmp_path)
    tree.expected = len(names)
    listings, fs = Listings(tree, names), FsThread()
    listings.start(fs)
    # every folder is listed before the first is asked for
    assert await asyncio.to_thread(tree.all_listed.wait, 10)
    got = [await listings.next(10.0) for _ in names]
    listings.stop()

    assert [g.path for g in got] == [bytes(tmp_path) + b"/" + n for n in names]
    assert [g.files[0].size_bytes for g in got] == [1, 2, 3, 4, 5]
    assert all(g.complete for g in got)


async def test_a_full_lookahead_waits_for_the_loop_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lister, "AHEAD_ENTRIES", 1)
    names = _library(tmp_path, 8)
    listings, fs = Listings(GatedTree(tmp_path), names), FsThread()
    listings.start(fs)
    got = [(await listings.next(10.0)).path for _ in names]
    listings.stop()
    assert got == [bytes(tmp_path) + b"/" + n for n in names]


async def test_a_listing_that_never_answers_is_given_up_on_after_the_io_timeout(
    tmp_path: Path,
) -> None:
    names = _library(tmp_path, 3)
    tree = GatedTree(tmp_path, gated=names[1])
    listings, fs = Listings(tree, names), FsThread()
    listings.start(fs)
    try:
        assert (await listings.next(10.0)).path.endswith(names[0])
        with pytest.raises(IoTimeout):
            await listings.next(0.1)
    finally:
        listings.stop()
        tree.gate.set()  # the stuck call returns: the thread ends
    await _flushed(fs)
    assert tree.listed == names[:2]  # stopped: nothing listed after the stuck one


async def test_a_stop_ends_the_listing_of_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lister, "AHEAD_ENTRIES", 1)
    names = _library(tmp_path, 10)
    tree = GatedTree(tmp_path)
    listings, fs = Listings(tree, names), FsThread()
    listings.start(fs)
    await listings.next(10.0)
    listings.stop()
    await _flushed(fs)
    assert len(tree.listed) < len(names)


async def test_a_scan_folder_that_cannot_be_opened_is_raised_to_the_loop(
    tmp_path: Path,
) -> None:
    names = _library(tmp_path / "lib", 1)
    tree = GatedTree(tmp_path / "lib")
    (tmp_path / "lib" / names[0].decode() / "v.mp4").unlink()
    (tmp_path / "lib" / names[0].decode()).rmdir()
    (tmp_path / "lib").rmdir()
    listings = Listings(tree, names)
    listings.start(FsThread())
    with pytest.raises(FileNotFoundError):
        await listings.next(10.0)
