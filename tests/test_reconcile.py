"""Rescans reconcile the catalog with the library, through a real server on real files, over
SQLite and PostgreSQL: deletions, moves, offline shares, unreadable directories, cancels,
remembered failures, reprobe, the missing retention and narrowed roots."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory, wait_terminal
from tests.media import write_video

SECOND_NS = 10**9


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Server overrides that choose the catalog's backend."""
    if request.param == "postgres":
        return {"database": request.getfixturevalue("postgres_url")}
    return {}


async def scan(s: Running, path: Path, **request: Any) -> pb.Job:
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(path), **request))
    return await wait_terminal(s.stub, job.id)


async def listed(s: Running, *, include_missing: bool = False) -> dict[str, pb.Video]:
    reply = await s.stub.ListVideos(
        pb.ListVideosRequest(page_size=1000, include_missing=include_missing)
    )
    return {v.path: v for v in reply.videos}


def counts(job: pb.Job) -> dict[str, int]:
    r = job.result
    names = ("added", "updated", "unchanged", "moved", "restored", "failed", "removed")
    return {n: getattr(r, n) for n in names if getattr(r, n)}


def _copy(sample: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample, target)
    return target


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_video(tmp_path / "sample.mp4")


async def test_a_rescan_reconciles_deletes_moves_changes_and_additions(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("a.mp4", "b.mp4", "sub/c.mp4", "sub/d.mp4"):
        _copy(sample, lib / name)
    s = await serve(lib, **backend)
    first = await scan(s, lib)
    before = await listed(s)

    (lib / "a.mp4").unlink()  # deleted
    (lib / "b.mp4").rename(lib / "b2.mp4")  # moved within its directory
    (lib / "sub" / "c.mp4").rename(lib / "c.mp4")  # moved across directories
    write_video(lib / "sub" / "d.mp4", frames=20)  # changed
    _copy(sample, lib / "e.mp4")  # added
    second = await scan(s, lib)
    after = await listed(s)
    missing = await listed(s, include_missing=True)

    assert counts(first) == {"added": 4}
    assert counts(second) == {"added": 1, "updated": 1, "moved": 2, "removed": 1}
    assert second.result.scanned == 4
    assert sorted(os.path.relpath(p, lib) for p in after) == [
        "b2.mp4", "c.mp4", "e.mp4", "sub/d.mp4",
    ]  # fmt: skip
    for old, new in (("b.mp4", "b2.mp4"), ("sub/c.mp4", "c.mp4")):
        moved, was = after[str(lib / new)], before[str(lib / old)]
        assert (moved.job_id, moved.first_seen_time) == (first.id, was.first_seen_time)
        assert moved.duration == was.duration
    assert after[str(lib / "sub" / "d.mp4")].job_id == second.id
    gone = missing[str(lib / "a.mp4")]
    assert gone.HasField("missing_time") and not after[str(lib / "e.mp4")].HasField("missing_time")


async def test_a_renamed_folder_moves_its_videos_with_their_metadata(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("Season 1/e1.mp4", "Season 1/extras/e0.mp4", "other.mp4"):
        _copy(sample, lib / name)
    s = await serve(lib, **backend)
    first = await scan(s, lib)
    (lib / "Season 1").rename(lib / "S01")
    renamed = await scan(s, lib)
    after = await listed(s)
    assert counts(renamed) == {"unchanged": 1, "moved": 2}
    assert sorted(os.path.relpath(p, lib) for p in after) == [
        "S01/e1.mp4", "S01/extras/e0.mp4", "other.mp4",
    ]  # fmt: skip
    assert {v.job_id for v in after.values()} == {first.id}


async def test_one_video_moved_to_two_hard_links_moves_once(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    _copy(sample, lib / "a.mp4")
    s = await serve(lib, **backend)
    await scan(s, lib)
    os.link(lib / "a.mp4", lib / "x.mp4")
    os.link(lib / "a.mp4", lib / "y.mp4")
    (lib / "a.mp4").unlink()
    again = await scan(s, lib)
    assert counts(again) == {"moved": 1, "added": 1}
    assert sorted(await listed(s, include_missing=True)) == [str(lib / "x.mp4"), str(lib / "y.mp4")]


async def test_a_share_moved_away_and_back_is_restored_without_a_probe(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("share/x.mp4", "share/deep/y.mp4", "keep.mp4"):
        _copy(sample, lib / name)
    s = await serve(lib, **backend)
    first = await scan(s, lib)

    (lib / "share").rename(tmp_path / "elsewhere")
    away = await scan(s, lib)
    while_away = await listed(s)
    (tmp_path / "elsewhere").rename(lib / "share")
    back = await scan(s, lib)
    after = await listed(s)

    assert counts(away) == {"unchanged": 1, "removed": 2}
    assert list(while_away) == [str(lib / "keep.mp4")]
    assert counts(back) == {"unchanged": 1, "restored": 2}
    assert {v.job_id for v in after.values()} == {first.id}  # none probed again
    assert not any(v.HasField("missing_time") for v in after.values())


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A tmpfs holding the share's files, and a mount point in the library it is bound to."""
    store, point = tmp_path / "store", tmp_path / "lib" / "nas"
    store.mkdir()
    point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(store)], check=True)
    try:
        yield store, point
    finally:
        subprocess.run(["umount", str(point)], check=False, capture_output=True)
        subprocess.run(["umount", str(store)], check=False)


def _bind(store: Path, point: Path) -> None:
    subprocess.run(["mount", "--bind", str(store), str(point)], check=True)


async def test_an_unmounted_share_keeps_its_videos_and_says_so(
    serve: ServeFactory,
    tmp_path: Path,
    sample: Path,
    mount_point: tuple[Path, Path],
    backend: dict[str, Any],
) -> None:
    store, point = mount_point
    _copy(sample, store / "a.mp4")
    _copy(sample, store / "season" / "b.mp4")
    _bind(store, point)
    lib = point.parent
    s = await serve(lib, **backend)
    first = await scan(s, lib)

    subprocess.run(["umount", str(point)], check=True)  # the share is offline: nas/ is empty
    offline = await scan(s, lib)
    during = await listed(s)
    offline_nas = await scan(s, point)  # scanning the mount point itself is no different
    _bind(store, point)
    online = await scan(s, lib)

    assert counts(first) == {"added": 2}
    assert counts(offline) == {}
    assert [(e.path, e.message) for e in offline.result.errors] == [
        (str(point), "empty mount point, is the share mounted? 2 videos kept")
    ]
    assert offline.state == pb.JOB_STATE_COMPLETED
    assert len(during) == 2
    assert counts(offline_nas) == {} and offline_nas.result.error_count == 1
    assert counts(online) == {"unchanged": 2}


async def test_an_emptied_folder_on_the_same_device_is_reconciled(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    _copy(sample, lib / "old" / "a.mp4")
    _copy(sample, lib / "old" / "inner" / "b.mp4")
    s = await serve(lib, **backend)
    await scan(s, lib)
    shutil.rmtree(lib / "old" / "inner")
    (lib / "old" / "a.mp4").unlink()
    emptied = await scan(s, lib)
    assert counts(emptied) == {"removed": 2}
    assert emptied.result.error_count == 0


@pytest.mark.parametrize("swap", ["file", "vanished"])
async def test_a_directory_unreadable_mid_walk_marks_nothing_missing(
    serve: ServeFactory,
    tmp_path: Path,
    sample: Path,
    backend: dict[str, Any],
    swap: str,
) -> None:
    # Directories are handed out one per scan worker, depth first in listing order. Both
    # workers are held on gated probes (the library itself, then its first folder), so no
    # worker reaches the victim, the last folder in listing order: it is swapped meanwhile.
    lib = tmp_path / "lib"
    for n in range(20):
        (lib / f"d{n:03}").mkdir(parents=True)
    order = [n for n in os.listdir(lib)]  # the walk visits them in this order
    victim, second = lib / order[-1], lib / order[0]
    for path in (lib / "gate.mp4", second / "gate.mp4", victim / "v.mp4", victim / "w.mp4"):
        _copy(sample, path)
    for gated in (lib, second):
        (gated / "open-gate").touch()
    s = await serve(lib, misbehaving=True, **backend)
    assert counts(await scan(s, lib)) == {"added": 4}
    for gated in (lib, second):
        (gated / "open-gate").unlink()
        os.utime(gated / "gate.mp4", ns=(1, 10**18))  # changed: probed (and held) again

    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(lib)))
    async for event in s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
        if event.job.progress.files_found >= 1:  # the library's own listing is in
            break
    shutil.rmtree(victim)
    if swap == "file":
        victim.write_bytes(b"not a directory any more")
    for gated in (lib, second):
        (gated / "open-gate").touch()
    final = await wait_terminal(s.stub, job.id)

    assert counts(final) == {"updated": 2}
    assert [e.path for e in final.result.errors] == [str(victim)]
    reason = "Not a directory" if swap == "file" else "No such file or directory"
    assert final.result.errors[0].message == f"cannot read directory: {reason}"
    assert {str(victim / "v.mp4"), str(victim / "w.mp4")} <= set(await listed(s))


async def test_a_cancel_reconciles_only_the_directories_it_finished(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("done/a.mp4", "done/b.mp4", "held/gate.mp4", "held/c.mp4"):
        _copy(sample, lib / name)
    (lib / "held" / "open-gate").touch()
    s = await serve(lib, misbehaving=True, **backend)
    await scan(s, lib)
    (lib / "held" / "open-gate").unlink()
    os.utime(lib / "held" / "gate.mp4", ns=(1, 10**18))
    (lib / "done" / "b.mp4").unlink()
    (lib / "held" / "c.mp4").unlink()

    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(lib)))
    async for event in s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
        if event.job.result.removed:  # done/ is reconciled; held/ waits on its probe
            break
    await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = await wait_terminal(s.stub, job.id)
    present = await listed(s)

    assert final.state == pb.JOB_STATE_CANCELLED
    assert counts(final) == {"unchanged": 1, "removed": 1}
    assert str(lib / "done" / "b.mp4") not in present
    assert str(lib / "held" / "c.mp4") in present  # its directory was never finished


async def test_a_non_recursive_scan_reconciles_only_direct_children(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        _copy(sample, lib / name)
    s = await serve(lib, **backend)
    await scan(s, lib)
    (lib / "a.mp4").unlink()
    shutil.rmtree(lib / "sub")
    flat = await scan(s, lib, recursive=False)
    assert counts(flat) == {"unchanged": 1, "removed": 1}
    assert sorted(await listed(s)) == [str(lib / "b.mp4"), str(lib / "sub" / "c.mp4")]
    deep = await scan(s, lib)
    assert counts(deep) == {"unchanged": 1, "removed": 1}


async def test_a_file_moved_out_of_a_settled_folder_and_back_is_catalogued_where_it_is(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("a/x.mp4", "a/y.mp4"):
        _copy(sample, lib / name)
    (lib / "b").mkdir()
    s = await serve(lib, **backend)
    await scan(s, lib)
    assert counts(await scan(s, lib)) == {"unchanged": 2}  # folder "a" is settled
    (lib / "a" / "x.mp4").rename(lib / "b" / "x.mp4")
    assert counts(await scan(s, lib / "b")) == {"moved": 1}
    (lib / "b" / "x.mp4").rename(lib / "a" / "x.mp4")  # "a" lists as it did when settled
    back = await scan(s, lib)
    assert counts(back) == {"unchanged": 1, "moved": 1}
    assert sorted(os.path.relpath(p, lib) for p in await listed(s)) == ["a/x.mp4", "a/y.mp4"]


async def test_a_file_changed_in_place_and_back_is_probed_each_time(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    video = _copy(sample, lib / "a" / "x.mp4")
    original, before = video.read_bytes(), video.stat()
    s = await serve(lib, **backend)
    await scan(s, lib)
    assert counts(await scan(s, lib)) == {"unchanged": 1}
    with video.open("r+b") as f:  # the same size, the same inode, other bytes
        f.seek(len(original) // 2)
        f.write(b"\0" * 16)
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns + SECOND_NS))
    assert counts(await scan(s, lib / "a")) == {"updated": 1}  # another job's write
    with video.open("r+b") as f:
        f.write(original)
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns))  # as the first scan saw it
    again = await scan(s, lib)
    assert counts(again) == {"updated": 1}
    assert (await listed(s))[str(video)].job_id == again.id


async def test_a_broken_file_is_remembered_and_not_read_again(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    _copy(sample, lib / "good.mp4")
    broken = lib / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    s = await serve(lib, **backend)
    first = await scan(s, lib)
    mtime_ns = broken.stat().st_mtime_ns
    # With relatime, reading a file whose atime is before its mtime moves the atime.
    os.utime(broken, ns=(mtime_ns - 3600 * SECOND_NS, mtime_ns))
    atime_before = broken.stat().st_atime_ns

    second = await scan(s, lib)
    atime_after_rescan = broken.stat().st_atime_ns
    errors = await s.stub.ListFileErrors(pb.ListFileErrorsRequest(path_prefix=str(lib)))
    reprobed = await scan(s, lib, reprobe=True)

    assert counts(first) == {"added": 1, "failed": 1}
    assert counts(second) == {"unchanged": 1, "failed": 1}
    assert [(e.path, e.message) for e in second.result.errors] == [
        (e.path, e.message) for e in first.result.errors
    ]
    assert atime_after_rescan == atime_before  # not opened again
    (listed_error,) = errors.file_errors
    assert (listed_error.path, listed_error.size_bytes, listed_error.job_id) == (
        str(broken), 1800, first.id,
    )  # fmt: skip
    assert listed_error.message.startswith("not a readable video")
    assert counts(reprobed) == {"updated": 1, "failed": 1}
    assert broken.stat().st_atime_ns != atime_before  # reprobe did read it


async def test_a_changed_broken_file_is_probed_again(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "x.mp4").write_bytes(b"half a download")
    s = await serve(lib, **backend)
    assert counts(await scan(s, lib)) == {"failed": 1}
    shutil.copyfile(sample, lib / "x.mp4")
    assert counts(await scan(s, lib)) == {"added": 1}
    errors = await s.stub.ListFileErrors(pb.ListFileErrorsRequest())
    assert list(errors.file_errors) == []


async def test_reprobe_probes_unchanged_files_and_counts_them_updated(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    _copy(sample, lib / "a.mp4")
    _copy(sample, lib / "sub" / "b.mp4")
    s = await serve(lib, **backend)
    await scan(s, lib)
    again = await scan(s, lib, reprobe=True)
    assert counts(again) == {"updated": 2}
    assert again.reprobe
    assert {v.job_id for v in (await listed(s)).values()} == {again.id}


async def test_missing_videos_are_purged_after_the_retention(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        _copy(sample, lib / name)
    now = [1_000 * SECOND_NS]
    s = await serve(lib, clock_ns=lambda: now[0], missing_retention_s=100.0, **backend)
    await scan(s, lib)
    (lib / "a.mp4").unlink()
    await scan(s, lib)  # a: missing since t=1000
    now[0] += 60 * SECOND_NS
    (lib / "b.mp4").unlink()
    await scan(s, lib)  # b: missing since t=1060
    now[0] += 50 * SECOND_NS  # t=1110: a is past the retention, b is not
    await scan(s, lib)

    assert sorted(await listed(s, include_missing=True)) == [
        str(lib / "b.mp4"), str(lib / "c.mp4"),
    ]  # fmt: skip


async def test_narrowed_roots_hide_the_old_rows_and_a_purge_deletes_them(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    _copy(sample, kept / "a.mp4")
    _copy(sample, dropped / "b.mp4")
    (dropped / "bad.mp4").write_bytes(b"broken")
    both = (str(kept), str(dropped))
    data = tmp_path / "shared-data"
    wide = await serve(kept, roots=both, data_dir=data, **backend)
    await scan(wide, kept)
    await scan(wide, dropped)
    await wide.app.stop()

    narrow = await serve(kept, roots=(str(kept),), data_dir=data, **backend)
    videos = await listed(narrow, include_missing=True)
    jobs = await narrow.stub.ListJobs(pb.ListJobsRequest(page_size=1))
    errors = await narrow.stub.ListFileErrors(pb.ListFileErrorsRequest())
    await narrow.app.stop()
    purging = await serve(
        kept, roots=(str(kept),), data_dir=data, purge_outside_roots=True, **backend
    )
    await purging.app.stop()
    wide_again = await serve(kept, roots=both, data_dir=data, **backend)

    assert list(videos) == [str(kept / "a.mp4")]
    assert [j.path for j in jobs.jobs] == [str(kept)]  # the newest visible job, one page
    assert list(errors.file_errors) == []
    assert list(await listed(wide_again)) == [str(kept / "a.mp4")]
    gone = await wide_again.stub.ListFileErrors(pb.ListFileErrorsRequest())
    assert list(gone.file_errors) == []
