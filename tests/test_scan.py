"""The walk and the scan handler, on real trees with odd entries."""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scanjobs.server import fsopen
from scanjobs.server import walk as walk_module
from scanjobs.server.catalog import DirectoryChanges, DirectoryRows, FileStamp, ScanCounts
from scanjobs.server.catalog_memory import InMemoryCatalog
from scanjobs.server.jobs import JobSpec, JobState, Phase
from scanjobs.server.probe import MediaInfo, ProbeFailure, ProbeOutcome, ProbeTarget
from scanjobs.server.queue import AsyncioJobQueue, QueueConfig
from scanjobs.server.roots import RootPolicy
from scanjobs.server.scan import Candidate, ScanConfig, Scanner, WalkError, walk
from scanjobs.server.scan_wire import Committed, DirectoryTask, Reply, WorkerSettings
from scanjobs.server.scanworker import DirectoryWork, LocalDirectories
from scanjobs.server.walk import OUTSIDE_ROOTS, Tree

VIDEO_EXTS = frozenset({b".mp4", b".mkv"})
INFO = MediaInfo("mov", 1.0, 1000, "h264", 64, 48, None, "", 0, 0, 0)


def _walk(root: Path, *, roots: Sequence[Path] | None = None, recursive: bool = True) -> list:
    policy = RootPolicy([str(r) for r in roots or [root]])
    folder = policy.locate(str(root))
    return list(walk(folder, recursive=recursive, extensions=VIDEO_EXTS, roots=policy))


def _names(items: list) -> set[bytes]:
    return {os.path.basename(i.path) for i in items if isinstance(i, Candidate)}


def test_walk_finds_videos_by_extension_case_insensitively(tmp_path: Path) -> None:
    (tmp_path / "a.MP4").write_bytes(b"x")
    (tmp_path / "b.mkv").write_bytes(b"x")
    (tmp_path / "c.txt").write_bytes(b"x")
    (tmp_path / "mp4").write_bytes(b"x")
    assert _names(_walk(tmp_path)) == {b"a.MP4", b"b.mkv"}


def test_walk_reports_size_mtime_and_identity(tmp_path: Path) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"12345")
    (item,) = _walk(tmp_path)
    st = video.stat()
    assert item.stamp == FileStamp(5, st.st_mtime_ns)
    assert (item.target.device, item.target.inode) == (st.st_dev, st.st_ino)


def test_walk_honours_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.mp4").write_bytes(b"x")
    (tmp_path / "sub" / "deep.mp4").write_bytes(b"x")
    assert _names(_walk(tmp_path, recursive=False)) == {b"top.mp4"}
    assert _names(_walk(tmp_path)) == {b"top.mp4", b"deep.mp4"}


def test_walk_survives_a_very_deep_tree(tmp_path: Path) -> None:
    # Deeper than Python's recursion limit once: the walk is iterative.
    depth = 400
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("deep.mp4", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "wb") as f:
            f.write(b"x")
    finally:
        os.close(fd)
    assert _names(_walk(tmp_path)) == {b"deep.mp4"}


def test_walk_skips_fifos_and_sockets_without_opening_them(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.mp4"))
    try:
        assert _walk(tmp_path) == []
    finally:
        sock.close()


def test_walk_follows_file_symlinks_only_inside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "real.mp4").write_bytes(b"x")
    (outside / "secret.mp4").write_bytes(b"secret")
    (root / "inside-link.mp4").symlink_to(root / "real.mp4")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)

    items = _walk(root)

    assert _names(items) == {b"real.mp4", b"inside-link.mp4"}
    errors = [i for i in items if isinstance(i, WalkError)]
    assert [os.path.basename(e.path) for e in errors] == [b"escape.mp4"]
    assert "outside the allowed roots" in errors[0].message


def test_walk_reports_symlink_loops_as_per_file_errors(tmp_path: Path) -> None:
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    (tmp_path / "loopdir").symlink_to(tmp_path, target_is_directory=True)
    items = _walk(tmp_path)
    assert [type(i) for i in items] == [WalkError]


def test_walk_finds_the_same_without_openat2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside.mp4").write_bytes(b"outside")
    (root / "a" / "b" / "deep.mp4").write_bytes(b"deep")
    (root / "a" / "in.mkv").symlink_to("b/deep.mp4")
    (root / "a" / "up.mp4").symlink_to("../../outside.mp4")
    (root / "dirlink").symlink_to(root / "a", target_is_directory=True)
    (root / "gone.mp4").symlink_to("missing.mp4")
    os.mkfifo(root / "pipe.mp4")
    with_openat2 = sorted(map(repr, _walk(root)))
    monkeypatch.setattr(fsopen, "has_openat2", lambda: False)
    assert sorted(map(repr, _walk(root))) == with_openat2
    assert len(with_openat2) == 4  # deep, in (followed), up (outside), gone (missing)


def test_a_listing_holds_one_folder_and_says_whether_it_is_complete(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "top.mp4").write_bytes(b"x")
    (tmp_path / "sub" / "a.mkv").write_bytes(b"x")
    (tmp_path / "gone").mkdir()
    policy = RootPolicy([str(tmp_path)])
    with Tree(policy.locate(str(tmp_path)), VIDEO_EXTS, policy) as tree:
        top = tree.list()
        sub = tree.list(b"sub")
        (tmp_path / "gone").rmdir()
        (tmp_path / "gone").symlink_to(tmp_path / "sub", target_is_directory=True)
        swapped = tree.list(b"gone")
    assert (top.complete, sorted(top.folders), _names(top.walk_items())) == (
        True, [b"gone", b"sub"], {b"top.mp4"},
    )  # fmt: skip
    assert (sub.complete, sub.folders, _names(sub.walk_items())) == (
        True,
        [b"sub/deeper"],
        {b"a.mkv"},
    )
    assert not swapped.complete
    assert [type(i) for i in swapped.walk_items()] == [WalkError]


def test_walk_keeps_non_utf8_names_exactly(tmp_path: Path) -> None:
    name = b"caf\xe9-\xff.mp4"
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
        f.write(b"x")
    (item,) = _walk(tmp_path)
    assert os.path.basename(item.path) == name


def _walk_as_nobody(root: Path) -> list[tuple[str, bytes]]:
    """Walk in a forked child that dropped root's privileges (root reads everything)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            items = _walk(root)
            found = sorted((type(i).__name__, os.path.basename(i.path)) for i in items)
            os.write(write_end, repr(found).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return ast.literal_eval(data.decode())


@pytest.fixture
def world_reachable_dir() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="scanjobs-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_walk_reports_unreadable_directories_as_per_file_errors(
    world_reachable_dir: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    root = world_reachable_dir
    (root / "locked").mkdir()
    (root / "ok.mp4").write_bytes(b"x")
    (root / "locked" / "hidden.mp4").write_bytes(b"x")
    (root / "locked").chmod(0o700)

    assert _walk_as_nobody(root) == [("Candidate", b"ok.mp4"), ("WalkError", b"locked")]


@pytest.mark.parametrize("storage", ["local", "slow"])
def test_a_listing_keeps_its_files_and_unreadable_entries_apart_in_listing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    # On "slow" storage every stat is too slow: after two, the rest go in flight on the pool.
    if storage == "slow":
        monkeypatch.setattr(walk_module, "_SLOW_STAT_S", -1.0)
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    for n in range(8):
        (lib / f"v{n}.mp4").write_bytes(b"x" * n)
    (lib / "away.mp4").symlink_to(tmp_path / "outside.mp4")
    os.mkfifo(lib / "fifo.mp4")  # not a regular file: skipped
    policy = RootPolicy([str(lib)])
    with ThreadPoolExecutor(4) as pool:
        stats = pool if storage == "slow" else None
        with Tree(policy.locate(str(lib)), VIDEO_EXTS, policy, stats=stats) as tree:
            listing = tree.list()
    listed = [n.encode() for n in os.listdir(lib)]

    assert listing.complete
    assert listing.unreadable == 1
    assert [os.path.basename(f.path) for f in listing.files] == [
        n for n in listed if n.startswith(b"v")
    ]
    assert [(os.path.basename(e.path), e.message) for e in listing.errors] == [
        (b"away.mp4", OUTSIDE_ROOTS)
    ]
    assert [os.path.basename(i.path) for i in listing.walk_items()] == [
        n for n in listed if n != b"fifo.mp4"
    ]


# -- the handler -------------------------------------------------------------------------


class FakeProber:
    """Returns the same metadata for every file, counting what it was asked."""

    def __init__(self) -> None:
        self.probed: list[bytes] = []

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        self.probed.extend(t.path for t in targets)
        await asyncio.sleep(0)
        return [INFO for _ in targets]


class GatedCatalog(InMemoryCatalog):
    """A catalog whose second commit waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.blocked = asyncio.Event()
        self.gate = asyncio.Event()

    async def commit(self, changes: DirectoryChanges) -> ScanCounts:
        self.commits += 1
        if self.commits == 2:
            self.blocked.set()
            await self.gate.wait()
        return await super().commit(changes)


def _tree(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (root / f"v{n:03}.mp4").write_bytes(b"x" * (n + 1))
    return root


class RecordingDirectories:
    """Directories done in this process, each task recorded with the replies it made."""

    def __init__(self, inner: LocalDirectories) -> None:
        self._inner = inner
        self.tasks: list[tuple[DirectoryTask, list[Reply]]] = []

    async def run(self, task: DirectoryTask, on_reply: Callable[[Reply], None]) -> None:
        replies: list[Reply] = []
        self.tasks.append((task, replies))

        def record(reply: Reply) -> None:
            replies.append(reply)
            on_reply(reply)

        await self._inner.run(task, record)


async def _run(
    root: Path,
    catalog: InMemoryCatalog,
    prober: FakeProber,
    recording: list[RecordingDirectories] | None = None,
    **cfg: int,
):
    """A queue whose scans do their directories in this process, on test doubles."""
    config = ScanConfig(**cfg)  # type: ignore[arg-type]
    roots = RootPolicy([str(root)])
    settings = WorkerSettings(
        database="", roots=(str(root),), resolutions=(str(root),),
        extensions=tuple(config.extensions),
        seen_resolution_ns=config.seen_resolution_ns, chunk=config.batch_size,
        probe_batch=config.probe_batch, probe_command=(),
    )  # fmt: skip
    directories = RecordingDirectories(
        LocalDirectories(DirectoryWork(catalog, prober, roots, settings))
    )
    if recording is not None:
        recording.append(directories)
    scanner = Scanner(roots, directories, catalog, config)
    queue = AsyncioJobQueue(scanner, QueueConfig())
    await queue.start()
    return queue


async def _final(queue: AsyncioJobQueue, job_id: str):
    async with await queue.watch(job_id) as events:
        return [e async for e in events][-1].job


async def test_rescan_counts_unchanged_and_probes_only_changes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "lib", 10)
    catalog, prober = InMemoryCatalog(), FakeProber()
    queue = await _run(root, catalog, prober, batch_size=4)
    try:
        first = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
        prober.probed.clear()
        (root / "v000.mp4").write_bytes(b"changed")
        (root / "new.mp4").write_bytes(b"new")
        second = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
    finally:
        await queue.close()

    assert (first.result.added, first.result.scanned) == (10, 10)
    r = second.result
    assert (r.added, r.updated, r.unchanged, r.failed) == (1, 1, 9, 0)
    assert sorted(os.path.basename(p) for p in prober.probed) == [b"new.mp4", b"v000.mp4"]


class ReadCountingCatalog(InMemoryCatalog):
    """Records, for each directory read, whether the catalog found it settled."""

    def __init__(self) -> None:
        super().__init__()
        self.settled: list[bool] = []

    async def read_directory(
        self, directory: bytes, digest: bytes = b"", fresh_after_ns: int = 0
    ) -> DirectoryRows:
        rows = await super().read_directory(directory, digest, fresh_after_ns)
        self.settled.append(rows.settled)
        return rows


async def test_a_rescan_of_an_unchanged_tree_reads_no_videos(tmp_path: Path) -> None:
    root = _tree(tmp_path / "lib", 3)
    _tree(root / "sub", 2)
    (root / "sub" / "broken.mp4").write_bytes(b"")
    catalog, prober = ReadCountingCatalog(), FakeProber()
    queue = await _run(root, catalog, prober)
    try:
        await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
        catalog.settled.clear()
        prober.probed.clear()
        again = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
    finally:
        await queue.close()

    assert catalog.settled == [True, True]
    assert (again.result.unchanged, again.result.failed, prober.probed) == (6, 0, [])


async def test_a_deleted_folder_leaves_its_parent_settled_once_it_was_found_gone(
    tmp_path: Path,
) -> None:
    root = _tree(tmp_path / "lib", 3)
    _tree(root / "sub", 2)
    _tree(root / "sub" / "deeper", 1)
    catalog = ReadCountingCatalog()
    queue = await _run(root, catalog, FakeProber())
    try:
        await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
        shutil.rmtree(root / "sub")
        found_gone = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
        catalog.settled.clear()
        again = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
    finally:
        await queue.close()

    assert (found_gone.result.removed, found_gone.result.unchanged) == (3, 3)
    assert catalog.settled == [True]  # one read of the root, not a second one for a gone folder
    assert (again.result.unchanged, again.result.removed) == (3, 0)


class JunkFailingProber(FakeProber):
    """Fails every file whose name starts with ``junk``."""

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        infos = await super().probe(targets)
        return [
            ProbeFailure("not a video") if os.path.basename(t.path).startswith(b"junk") else i
            for t, i in zip(targets, infos, strict=True)
        ]


async def test_a_rescan_sends_only_the_failures_its_job_keeps_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    root = tmp_path / "lib"
    for folder in range(6):
        _tree(root / f"d{folder}", 2)
        for n in range(5):
            (root / f"d{folder}" / f"junk{n}.mp4").write_bytes(b"junk")
    catalog, prober, recording = InMemoryCatalog(), JunkFailingProber(), []
    queue = await _run(root, catalog, prober, recording, max_errors=3, lanes=2)
    try:
        first = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
        (directories,) = recording
        directories.tasks.clear()
        prober.probed.clear()
        again = await _final(queue, (await queue.submit(JobSpec(str(root)))).id)
    finally:
        await queue.close()

    for job in (first, again):  # the same failures kept and counted as when all were sent
        r = job.result
        assert (r.failed, r.error_count, r.unchanged + r.added) == (30, 30, 12)
        assert len(r.errors) == 3
        assert {e.message for e in r.errors} == {"not a video"}
    assert prober.probed == []  # remembered failures are not opened again
    sent = dropped = 0
    for task, replies in directories.tasks:
        commits = [reply for reply in replies if isinstance(reply, Committed)]
        task_sent = sum(len(c.errors) for c in commits)
        assert task_sent <= max(task.errors_wanted, 0)
        sent += task_sent
        dropped += sum(c.errors_dropped for c in commits)
    assert sent + dropped == 30
    assert sent <= 2 * 3  # at most what each of the two lanes' jobs could still keep


async def test_cancel_during_a_commit_reports_exactly_what_the_catalog_holds(
    tmp_path: Path,
) -> None:
    root = _tree(tmp_path / "lib", 40)
    catalog, prober = GatedCatalog(), FakeProber()
    queue = await _run(root, catalog, prober, batch_size=4, lanes=1)
    try:
        job = await queue.submit(JobSpec(str(root)))
        await catalog.blocked.wait()  # the second batch's commit is in flight
        await queue.cancel(job.id)
        await asyncio.sleep(0.01)
        catalog.gate.set()
        final = await _final(queue, job.id)
        videos, _ = await catalog.list_videos(
            path_prefix=b"", job_id=job.id, page_size=1000, page_token=""
        )
    finally:
        await queue.close()

    assert final.state is JobState.CANCELLED
    assert final.result.added == len(videos) == 8


async def test_scan_fails_when_the_directory_vanished_before_it_started(tmp_path: Path) -> None:
    root = _tree(tmp_path / "lib", 1)
    queue = await _run(tmp_path, InMemoryCatalog(), FakeProber())
    try:
        job = await queue.submit(JobSpec(str(root)))
        (root / "v000.mp4").unlink()
        root.rmdir()
        final = await _final(queue, job.id)
    finally:
        await queue.close()
    assert final.state is JobState.FAILED
    assert "does not exist" in final.error


class GatedProber(FakeProber):
    """Blocks every probe until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        self.entered.set()
        await self.gate.wait()
        return await super().probe(targets)


async def test_cancel_during_discovery_stops_handing_out_directories(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for d in range(20):
        _tree(root / f"d{d:02}", 20)
    prober = GatedProber()
    queue = await _run(root, InMemoryCatalog(), prober, batch_size=4, lanes=1)
    try:
        job = await queue.submit(JobSpec(str(root)))
        await prober.entered.wait()
        running = await queue.get(job.id)
        await queue.cancel(job.id)
        final = await _final(queue, job.id)
    finally:
        await queue.close()
    assert running.progress.phase is Phase.DISCOVERING
    assert final.state is JobState.CANCELLED
    assert final.progress.files_found == 20  # one folder listed; the other 19 never handed out
    assert prober.probed == []


async def test_small_trees_are_counted_before_probing_ends(tmp_path: Path) -> None:
    root = _tree(tmp_path / "lib", 50)
    prober = GatedProber()
    queue = await _run(root, InMemoryCatalog(), prober, batch_size=4, lanes=1)
    try:
        job = await queue.submit(JobSpec(str(root)))
        await prober.entered.wait()
        async with await queue.watch(job.id) as events:
            async for event in events:
                seen = event.job
                if seen.progress.phase is Phase.PROBING:
                    break
        prober.gate.set()
        final = await _final(queue, job.id)
    finally:
        await queue.close()
    assert (seen.progress.phase, seen.progress.files_found) == (Phase.PROBING, 50)
    assert final.result.added == 50
