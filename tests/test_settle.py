"""The Settler on a simulated file system and clock: when a burst of changes becomes scans,
and of which directories."""

from __future__ import annotations

import os
import stat

from scanjobs.server.settle import ChangeType, ScanRequest, Settler

ADDED, MODIFIED, DELETED = ChangeType.ADDED, ChangeType.MODIFIED, ChangeType.DELETED


class FakeFiles:
    def __init__(self) -> None:
        self.files: dict[bytes, tuple[int, int]] = {}  # path -> (mode, size)

    def put(self, path: bytes, size: int = 10) -> None:
        self.files[path] = (stat.S_IFREG | 0o644, size)

    def mkdir(self, path: bytes) -> None:
        self.files[path] = (stat.S_IFDIR | 0o755, 0)

    def stat(self, path: bytes) -> os.stat_result:
        if path not in self.files:
            raise FileNotFoundError(path)
        mode, size = self.files[path]
        return os.stat_result((mode, 1, 1, 1, 0, 0, size, 0, size, size))


def settler(fs: FakeFiles, **kw: int) -> Settler:
    return Settler(b"/lib", 2.0, [b".mp4"], stat_path=fs.stat, **kw)


def test_a_changed_file_is_scanned_once_quiet_for_the_settle_time() -> None:
    fs = FakeFiles()
    fs.put(b"/lib/a/x.mp4")
    s = settler(fs)
    s.record(ADDED, b"/lib/a/x.mp4", 0.0)
    assert s.ready(1.9) == []
    assert s.ready(2.0) == [ScanRequest(b"/lib/a", False)]
    assert not s and s.ready(10.0) == []


def test_a_file_still_growing_waits_until_its_stamp_holds() -> None:
    fs = FakeFiles()
    fs.put(b"/lib/x.mp4", 10)
    s = settler(fs)
    s.record(ADDED, b"/lib/x.mp4", 0.0)
    fs.put(b"/lib/x.mp4", 20)  # grew without an event reaching us
    assert s.ready(2.5) == []
    assert s.ready(4.0) == []
    assert s.ready(4.5) == [ScanRequest(b"/lib", False)]


def test_a_new_event_restarts_the_wait() -> None:
    fs = FakeFiles()
    fs.put(b"/lib/x.mp4")
    s = settler(fs)
    s.record(ADDED, b"/lib/x.mp4", 0.0)
    s.record(MODIFIED, b"/lib/x.mp4", 1.5)
    assert s.ready(3.0) == []
    assert s.ready(3.5) == [ScanRequest(b"/lib", False)]


def test_a_delete_scans_the_directory_it_was_in() -> None:
    s = settler(FakeFiles())
    s.record(DELETED, b"/lib/a/gone", 0.0)
    assert s.ready(2.0) == [ScanRequest(b"/lib/a", False)]


def test_a_new_directory_is_scanned_with_everything_below_it() -> None:
    fs = FakeFiles()
    fs.put(b"/lib/new/sub/x.mp4")
    fs.mkdir(b"/lib/new")
    s = settler(fs)
    s.record(ADDED, b"/lib/new/sub/x.mp4", 0.0)
    s.record(ADDED, b"/lib/new", 0.1)
    s.record(ADDED, b"/lib/new/sub/x.mp4", 0.2)
    assert s.ready(2.5) == [ScanRequest(b"/lib/new", True)]


def test_files_that_are_not_videos_are_ignored() -> None:
    fs = FakeFiles()
    fs.put(b"/lib/notes.txt")
    fs.mkdir(b"/lib/old")
    s = settler(fs)
    s.record(ADDED, b"/lib/notes.txt", 0.0)
    s.record(MODIFIED, b"/lib/old", 0.0)  # a directory's own change: its entries report
    assert not s


def test_a_burst_over_many_directories_becomes_one_shared_scan() -> None:
    fs = FakeFiles()
    s = settler(fs, max_requests=3)
    for d in range(5):
        fs.put(b"/lib/batch/d%d/x.mp4" % d)
        s.record(ADDED, b"/lib/batch/d%d/x.mp4" % d, 0.0)
    assert s.ready(2.0) == [ScanRequest(b"/lib/batch", True)]
    fs.put(b"/lib/x.mp4")
    fs.put(b"/lib/other/y.mp4")
    for path in (b"/lib/x.mp4", b"/lib/other/y.mp4", b"/lib/batch/z.mp4", b"/lib/b2/z.mp4"):
        fs.put(path)
        s.record(ADDED, path, 5.0)
    assert s.ready(7.0) == [ScanRequest(b"/lib", True)]
