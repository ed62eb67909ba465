"""--watch on real inotify, through a real server: files copied in, written slowly, deleted,
renamed; a burst of many files; the watch limit reached; the catalog changes it makes are
read from WatchVideos (waits are on events, with generous outer timeouts)."""

from __future__ import annotations

import asyncio
import errno
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from scanjobs.server import library_watch as watch_module
from scanjobs.server.library_watch import network_filesystem
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory
from tests.media import write_video

K = pb.VideoEventKind
WATCH = {"watch": True, "watch_settle_s": 0.5, "poll_interval_s": 0.5}


class Changes:
    """A WatchVideos stream from the start of the catalog's history."""

    def __init__(self, s: Running) -> None:
        self.stream = s.stub.WatchVideos(pb.WatchVideosRequest())

    async def next(self, count: int = 1, timeout: float = 60) -> list[pb.VideoEvent]:
        events = []
        async with asyncio.timeout(timeout):
            while len(events) < count:
                events.append(await self.stream.read())
        return events


async def roots(s: Running) -> list[pb.Root]:
    return list((await s.stub.ListRoots(pb.ListRootsRequest())).roots)


async def until(check: Any, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def reconciled(s: Running) -> None:
    """Wait for the start-up reconcile of every root."""

    async def done() -> bool:
        return all(r.HasField("last_reconcile_time") for r in await roots(s))

    await until(done)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_video(tmp_path / "sample.mp4")


@pytest.fixture
async def lib(tmp_path: Path) -> AsyncIterator[Path]:
    library = tmp_path / "lib"
    library.mkdir()
    yield library


def name(event: pb.VideoEvent) -> tuple[int, str, str]:
    return event.kind, Path(event.video.path).name, Path(event.previous_path).name


async def test_a_file_copied_in_is_added_once_with_its_metadata(
    serve: ServeFactory, lib: Path, sample: Path
) -> None:
    s = await serve(lib, **WATCH)
    await reconciled(s)
    changes = Changes(s)
    shutil.copyfile(sample, lib / "a.mp4")
    (added,) = await changes.next()
    assert name(added) == (K.VIDEO_EVENT_KIND_ADDED, "a.mp4", "")
    assert added.video.width > 0 and added.video.duration.ToNanoseconds() > 0
    shutil.copyfile(sample, lib / "b.mp4")  # the next change is b's: a came once
    (following,) = await changes.next()
    assert name(following) == (K.VIDEO_EVENT_KIND_ADDED, "b.mp4", "")
    jobs = (await s.stub.ListJobs(pb.ListJobsRequest())).jobs
    triggers = {j.trigger for j in jobs}
    assert triggers == {pb.JOB_TRIGGER_SCHEDULE, pb.JOB_TRIGGER_WATCH}
    assert all(not j.recursive for j in jobs if j.trigger == pb.JOB_TRIGGER_WATCH)
    (root,) = await roots(s)
    assert (root.watch_mode, root.reason, root.video_count) == (pb.WATCH_MODE_EVENTS, "", 2)


async def test_a_file_written_slowly_is_probed_once_complete(
    serve: ServeFactory, lib: Path, sample: Path
) -> None:
    s = await serve(lib, watch=True, watch_settle_s=2.0)
    await reconciled(s)
    changes = Changes(s)
    data = sample.read_bytes()
    third = len(data) // 3
    with (lib / "slow.mp4").open("wb") as out:
        for start in (0, third, 2 * third):
            out.write(data[start : start + third] if start < 2 * third else data[start:])
            out.flush()
            await asyncio.sleep(1.0)  # the slow copy itself: 3 parts over 3 seconds
    (added,) = await changes.next()
    assert name(added) == (K.VIDEO_EVENT_KIND_ADDED, "slow.mp4", "")
    assert added.video.size_bytes == len(data)
    shutil.copyfile(sample, lib / "marker.mp4")
    (following,) = await changes.next()
    assert name(following) == (K.VIDEO_EVENT_KIND_ADDED, "marker.mp4", "")
    errors = await s.stub.ListFileErrors(pb.ListFileErrorsRequest())
    assert list(errors.file_errors) == []
    jobs = (await s.stub.ListJobs(pb.ListJobsRequest())).jobs
    assert all(j.result.failed == 0 for j in jobs)


async def test_deletes_and_renames_become_removed_and_moved(
    serve: ServeFactory, lib: Path, sample: Path
) -> None:
    for rel in ("a.mp4", "b.mp4", "c.mp4", "one/d.mp4"):
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample, lib / rel)
    (lib / "two").mkdir()
    s = await serve(lib, **WATCH)
    await reconciled(s)
    changes = Changes(s)
    await changes.next(4)  # the start-up reconcile's additions

    (lib / "a.mp4").unlink()
    (removed,) = await changes.next()
    assert name(removed) == (K.VIDEO_EVENT_KIND_REMOVED, "a.mp4", "")

    (lib / "b.mp4").rename(lib / "b2.mp4")
    (moved,) = await changes.next()
    assert name(moved) == (K.VIDEO_EVENT_KIND_MOVED, "b2.mp4", "b.mp4")

    (lib / "one" / "d.mp4").rename(lib / "two" / "d.mp4")
    across = await changes.next()
    while across[-1].kind != K.VIDEO_EVENT_KIND_MOVED:  # the old directory may go first
        assert name(across[-1]) == (K.VIDEO_EVENT_KIND_REMOVED, "d.mp4", "")
        across += await changes.next()
    assert name(across[-1]) == (K.VIDEO_EVENT_KIND_MOVED, "d.mp4", "d.mp4")
    assert across[-1].video.path == str(lib / "two" / "d.mp4")
    assert across[-1].previous_path == str(lib / "one" / "d.mp4")


async def test_many_files_copied_at_once_make_few_jobs_and_each_file_is_added_once(
    serve: ServeFactory, lib: Path, sample: Path, tmp_path: Path
) -> None:
    s = await serve(lib, **WATCH)
    await reconciled(s)
    changes = Changes(s)
    staging = tmp_path / "staging"
    for d in range(20):  # 10,000 copies of one tiny video, 500 in each of 20 folders
        folder = staging / f"d{d:02}"
        folder.mkdir(parents=True)
        for f in range(500):
            shutil.copyfile(sample, folder / f"f{f:03}.mp4")
    shutil.copytree(staging, lib / "batch")
    events = await changes.next(10_000, timeout=600)
    assert {e.kind for e in events} == {K.VIDEO_EVENT_KIND_ADDED}
    assert len({e.video.path for e in events}) == 10_000
    jobs = (await s.stub.ListJobs(pb.ListJobsRequest(page_size=1000))).jobs
    watch_jobs = [j for j in jobs if j.trigger == pb.JOB_TRIGGER_WATCH]
    assert 1 <= len(watch_jobs) <= 8
    assert sum(j.result.added for j in watch_jobs) == 10_000


async def test_an_exhausted_watch_limit_falls_back_to_polling_and_says_so(
    serve: ServeFactory, lib: Path, sample: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    real = watch_module.event_source

    def limited(root: str, *, polling: bool, poll_s: float) -> Any:
        if not polling:
            raise OSError(errno.ENOSPC, "No space left on device (os error 28)")
        return real(root, polling=polling, poll_s=poll_s)

    monkeypatch.setattr(watch_module, "event_source", limited)
    s = await serve(lib, **WATCH)
    await reconciled(s)
    (root,) = await roots(s)
    assert root.watch_mode == pb.WATCH_MODE_POLLING
    assert "ENOSPC" in root.reason and "max_user_watches" in root.reason
    assert any("polled" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    changes = Changes(s)
    shutil.copyfile(sample, lib / "a.mp4")
    (added,) = await changes.next()
    assert name(added) == (K.VIDEO_EVENT_KIND_ADDED, "a.mp4", "")


def test_network_file_systems_are_found_in_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /srv/nas rw,relatime shared:2 - nfs4 nas:/export rw,vers=4.2\n"
        "41 40 0:51 / /srv/nas/local rw - tmpfs tmpfs rw\n"
        "42 22 0:52 / /mnt/my\\040share rw - cifs //host/share rw\n"
    )
    assert network_filesystem("/srv/nas/films", str(table)) == "nfs4"
    assert network_filesystem("/srv/nas", str(table)) == "nfs4"
    assert network_filesystem("/srv/nas/local/x", str(table)) is None
    assert network_filesystem("/srv/nasty", str(table)) is None
    assert network_filesystem("/mnt/my share/films", str(table)) == "cifs"
    assert network_filesystem("/home", str(table)) is None


async def test_one_replica_watches_and_another_takes_over_when_it_stops(
    serve: ServeFactory, lib: Path, sample: Path, postgres_url: str
) -> None:
    options = {**WATCH, "database": postgres_url, "lease_s": 0.5}
    first = await serve(lib, **options)
    second = await serve(lib, **options)

    def watches(s: Running) -> bool:  # this replica's own mode: its metrics
        labels = {"root": str(lib.resolve()), "mode": "events"}
        return s.app.metrics.registry.get_sample_value("scanjobs_root_watch_mode", labels) == 1

    async def one_leads() -> bool:
        return sorted([watches(first), watches(second)]) == [False, True]

    await until(one_leads)
    leader, other = (first, second) if watches(first) else (second, first)
    await reconciled(leader)
    await reconciled(other)  # any replica reports the leader's view of the roots
    (led,), (followed,) = await roots(leader), await roots(other)
    assert followed.watch_mode == led.watch_mode == pb.WATCH_MODE_EVENTS
    assert followed.reason == led.reason
    assert followed.last_reconcile_time == led.last_reconcile_time
    changes = Changes(other)  # any replica serves the changes
    await leader.app.stop()

    async def other_leads() -> bool:
        return watches(other)

    await until(other_leads)
    await reconciled(other)
    shutil.copyfile(sample, lib / "a.mp4")
    (added,) = await changes.next()
    assert name(added) == (K.VIDEO_EVENT_KIND_ADDED, "a.mp4", "")
