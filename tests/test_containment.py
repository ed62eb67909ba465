"""Containment by descriptor: whatever the file system does mid-scan, no scan leaves its roots.

Each test plants a sentinel video outside the root whose access time is far in the past, so
that any read of it would move it (relatime), and makes the race happen on purpose: the
server's open of a folder is held in the kernel (fanotify) while the test swaps the tree, or
the swap happens inside the server's own path resolution.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from scanjobs.server.errors import ScanJobsError
from scanjobs.server.roots import RootPolicy
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory, until_running, wait_terminal
from tests.media import write_video
from tests.opengate import first_open_of

OUTSIDE = "symlink points outside the allowed roots"
REPLACED = "cannot read directory: it was replaced by a symlink, which is not followed"


@dataclass
class Library:
    root: Path
    outside: Path
    sentinel: Path

    def sentinel_read(self, before: int) -> bool:
        return self.sentinel.stat().st_atime_ns != before


@pytest.fixture
def library(tmp_path: Path) -> Library:
    root, outside = tmp_path / "lib", tmp_path / "lib-outside"
    for name in ("first", "second"):
        (root / name).mkdir(parents=True)
        write_video(root / name / f"{name}.mp4")
    (outside / "deeper").mkdir(parents=True)
    sentinel = write_video(outside / "secret.mp4")
    write_video(outside / "deeper" / "secret2.mp4")
    os.utime(sentinel, (1, time.time()))
    return Library(root, outside, sentinel)


async def _catalogued(s: Running) -> set[str]:
    reply = await s.stub.ListVideos(pb.ListVideosRequest(page_size=1000))
    return {v.path for v in reply.videos}


def _swap_for_symlink(folder: Path, target: Path) -> Callable[[], None]:
    """Rename ``folder`` away and put a symlink to ``target`` in its place; returns the undo."""
    moved = folder.with_name(folder.name + "-moved")
    folder.rename(moved)
    folder.symlink_to(target, target_is_directory=True)

    def undo() -> None:
        folder.unlink()
        moved.rename(folder)

    return undo


async def test_a_folder_swapped_for_a_symlink_mid_walk_is_never_followed(
    serve: ServeFactory, library: Library, resolver: str
) -> None:
    # One scan worker: the folders are opened one after the other, so the swap of the
    # second lands before it is opened (two workers may open it while the swap runs, and
    # refuse its file at the probe instead).
    s = await serve(library.root, probe_processes=1)
    before = library.sentinel.stat().st_atime_ns
    swapped: list[Path] = []
    undo: list[Callable[[], None]] = []

    def swap_the_other(opened: Path) -> None:
        other = next(p for p in folders if p.name != opened.name)
        undo.append(_swap_for_symlink(other, library.outside))
        swapped.append(other)

    folders = [library.root / "first", library.root / "second"]
    for _ in range(4):  # whichever folder the walk opens first, the other is swapped
        swapped.clear()
        undo.clear()
        with first_open_of(folders, swap_the_other) as acted:
            job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(library.root)))
            final = await wait_terminal(s.stub, job.id)
        assert acted.is_set(), "the walk never opened a folder: the race did not happen"
        errors = {e.path: e.message for e in final.result.errors}
        assert final.state == pb.JOB_STATE_COMPLETED
        assert errors == {str(swapped[0]): REPLACED}  # the walk met the swap, and refused it
        assert not any("secret" in p for p in await _catalogued(s))
        assert not library.sentinel_read(before), "a file outside the roots was read"
        undo[0]()


def test_a_folder_swapped_for_a_symlink_between_its_resolution_and_its_open_is_refused(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the root check (in its helper process) does: resolve, then open by descriptor.
    target = library.root / "first"
    real_realpath = os.path.realpath

    def realpath_then_swap(path: str, *args: object, **kwargs: object) -> str:
        resolved = real_realpath(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path) == str(target):
            _swap_for_symlink(target, library.outside)
        return resolved

    roots = RootPolicy([str(library.root)])
    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    with pytest.raises(ScanJobsError, match="a symlink is not followed"):
        roots.locate(str(target))


async def test_a_folder_swapped_for_a_symlink_between_submit_and_start_is_refused(
    serve: ServeFactory, library: Library
) -> None:
    # One job at a time: a job held on a gated probe keeps the second one pending while its
    # folder, checked at submit, is swapped for a symlink; the check at its start refuses it.
    target = library.root / "first"
    held = library.root / "held"
    held.mkdir()
    (held / "gate.mp4").write_bytes(b"x")
    s = await serve(library.root, misbehaving=True, workers=1)
    before = library.sentinel.stat().st_atime_ns
    first = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(held)))
    await until_running(s.stub, first.id)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(target)))
    _swap_for_symlink(target, library.outside)
    (held / "open-gate").touch()
    final = await wait_terminal(s.stub, job.id)

    assert (await wait_terminal(s.stub, first.id)).state == pb.JOB_STATE_COMPLETED
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error.endswith("resolves outside the allowed roots")
    assert not any("secret" in p for p in await _catalogued(s))
    assert not library.sentinel_read(before), "a file outside the roots was read"


async def test_escaping_symlinks_say_nothing_about_what_exists_outside(
    serve: ServeFactory, library: Library, resolver: str
) -> None:
    """A link through an outside folder gets one answer whether or not that folder exists."""
    (library.outside / "present").mkdir()
    video = library.root / "first" / "first.mp4"
    links = {}
    for name in ("present", "absent"):
        through = library.outside / name
        links[f"abs-{name}.mp4"] = Path(f"{through}/../../lib/first/first.mp4")
        links[f"rel-{name}.mp4"] = Path(f"../lib-outside/{name}/../../lib/first/first.mp4")
    for link, target in links.items():
        (library.root / link).symlink_to(target)
    assert (library.root / "abs-present.mp4").resolve() == video.resolve()  # the kernel's view

    s = await serve(library.root)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(library.root)))
    final = await wait_terminal(s.stub, job.id)

    errors = {Path(e.path).name: e.message for e in final.result.errors}
    assert errors == dict.fromkeys(links, OUTSIDE)
    assert final.result.added == 2  # first.mp4 and second.mp4 by their own names


async def test_a_file_symlink_that_stays_inside_the_roots_is_followed(
    serve: ServeFactory, library: Library
) -> None:
    (library.root / "first" / "sub").mkdir()
    (library.root / "first" / "sub" / "rel.mp4").symlink_to("../../second/second.mp4")
    (library.root / "abs.mp4").symlink_to(library.root / "first" / "first.mp4")
    s = await serve(library.root)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(library.root)))
    final = await wait_terminal(s.stub, job.id)
    assert (final.result.added, final.result.failed) == (4, 0)
