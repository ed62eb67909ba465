"""The test share itself: a faithful passthrough, slow on every operation, hung on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fusefs import SHARE_VIDEOS, SlowShare, is_mounted, mounted

_STAT = (sys.executable, "-c", "import os, sys; os.stat(sys.argv[1])")
_HOLD = (
    sys.executable,
    "-c",
    "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()",
)

_OWNER = (
    sys.executable,
    "-c",
    textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from tests.fusefs import mounted
        with mounted(Path(sys.argv[1]), Path(sys.argv[2])) as share:
            print(share.process.pid, flush=True)
            time.sleep(120)
    """),
)
_REPOSITORY = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path below `root` with its mode, size, mtime and inode number."""
    tree = {}
    for path in root.rglob("*"):
        st = path.lstat()
        tree[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return tree


def test_files_read_through_the_share_equal_their_source(slow_share: SlowShare) -> None:
    for name in SHARE_VIDEOS:
        assert (slow_share.path / name).read_bytes() == (slow_share.source / name).read_bytes()


def test_the_share_lists_and_stats_every_file_as_its_source_does(slow_share: SlowShare) -> None:
    assert _tree(slow_share.path) == _tree(slow_share.source)
    assert is_mounted(slow_share.path)


def test_a_folder_too_large_for_one_listing_chunk_lists_every_entry_once(
    slow_share: SlowShare,
) -> None:
    many = slow_share.source / "many"
    many.mkdir()
    for n in range(500):
        (many / f"episode {n:03}.mkv").write_bytes(b"x" * n)
    slow_share.set_delay(0)  # 500 stats one after another: the delay is not what is tested

    assert sorted(os.listdir(slow_share.path / "many")) == sorted(os.listdir(many))
    assert _tree(slow_share.path / "many") == _tree(many)


def test_changes_to_the_source_show_on_the_share_at_once(slow_share: SlowShare) -> None:
    (slow_share.path / "a.mp4").stat()  # looked up once: a cache would now hold it
    (slow_share.source / "a.mp4").write_bytes(b"replaced")
    (slow_share.source / "new.mkv").write_bytes(b"new")

    assert (slow_share.path / "a.mp4").stat().st_size == len(b"replaced")
    assert "new.mkv" in os.listdir(slow_share.path)


def test_every_stat_takes_the_delay_as_nothing_is_cached(slow_share: SlowShare) -> None:
    slow_share.set_delay(0.05)
    before = slow_share.stats().ops
    for _ in range(3):
        started = time.monotonic()
        os.stat(slow_share.path / "a.mp4")
        assert time.monotonic() - started >= 0.05

    assert slow_share.stats().ops >= before + 3


def test_an_operation_below_a_hung_folder_blocks_until_released(slow_share: SlowShare) -> None:
    slow_share.hang("dead")
    with ThreadPoolExecutor(1) as pool:
        try:
            stat = pool.submit(os.stat, slow_share.path / "dead" / "deeper" / "d.mp4")
            slow_share.wait_blocked(1)
            assert not stat.done()
            assert slow_share.stats().blocked == 1
        finally:
            slow_share.release()
        assert (
            stat.result(timeout=10).st_size == (slow_share.source / SHARE_VIDEOS[3]).stat().st_size
        )

    assert slow_share.stats().blocked == 0


def test_the_rest_of_the_share_answers_while_a_folder_hangs(slow_share: SlowShare) -> None:
    slow_share.hang("dead")
    with ThreadPoolExecutor(1) as pool:
        try:
            stuck = pool.submit(os.listdir, slow_share.path / "dead")
            slow_share.wait_blocked(1)
            # The parent still lists it, with its type: no look-up of the hung folder needed.
            with os.scandir(slow_share.path) as listing:
                kinds = {entry.name: entry.is_dir() for entry in listing}
            assert kinds == {"a.mp4": False, "shows": True, "dead": True}
            assert (slow_share.path / "shows" / "b.mkv").read_bytes()
            assert not stuck.done()
        finally:
            slow_share.release("dead")
        assert sorted(stuck.result(timeout=10)) == ["c.mp4", "deeper"]


def test_a_hung_folder_answers_stat_but_blocks_listing_and_opening(
    slow_share: SlowShare,
) -> None:
    slow_share.hang("dead")
    with ThreadPoolExecutor(2) as pool:
        try:
            listing = pool.submit(os.listdir, slow_share.path / "dead")
            opening = pool.submit(os.open, slow_share.path / "dead", os.O_RDONLY | os.O_DIRECTORY)
            slow_share.wait_blocked(2)
            assert (slow_share.path / "dead").stat().st_ino == (
                slow_share.source / "dead"
            ).stat().st_ino
            assert not listing.done() and not opening.done()
        finally:
            slow_share.release()
        os.close(opening.result(timeout=10))
        assert sorted(listing.result(timeout=10)) == ["c.mp4", "deeper"]


def test_many_operations_hang_at_once_and_the_rest_of_the_share_still_answers(
    slow_share: SlowShare,
) -> None:
    # More than libfuse's default of 10 threads: each blocked operation holds one.
    files = [slow_share.source / "dead" / f"{n}.mkv" for n in range(20)]
    for path in files:
        path.write_bytes(b"x")
    fds = [
        os.open(slow_share.path / path.relative_to(slow_share.source), os.O_RDONLY)
        for path in files
    ]
    slow_share.hang("dead")
    with ThreadPoolExecutor(len(fds)) as pool:
        try:
            stats = [pool.submit(os.fstat, fd) for fd in fds]
            slow_share.wait_blocked(len(fds))
            assert (slow_share.path / "shows" / "b.mkv").read_bytes()
            assert not any(stat.done() for stat in stats)
        finally:
            slow_share.release()
        assert all(stat.result(timeout=10).st_size == 1 for stat in stats)
    for fd in fds:
        os.close(fd)


def test_a_hung_folder_names_a_path_inside_the_share(slow_share: SlowShare) -> None:
    with pytest.raises(ValueError, match="not a path inside the share"):
        slow_share.hang("../elsewhere")
    with pytest.raises(ValueError, match="not a path inside the share"):
        slow_share.hang("/dead")
    with pytest.raises(ValueError, match="not a path inside the share"):
        slow_share.hang(".")


def test_leaving_the_mount_with_an_operation_stuck_frees_it_and_leaves_no_mount(
    tmp_path: Path,
) -> None:
    (tmp_path / "source" / "dead").mkdir(parents=True)
    (tmp_path / "source" / "dead" / "c.mp4").write_bytes(b"x")
    with mounted(tmp_path / "source", tmp_path / "share") as share:  # as slow_share does
        share.hang("dead")
        stuck = subprocess.Popen([*_STAT, str(share.path / "dead" / "c.mp4")])
        share.wait_blocked(1)
    try:
        assert stuck.wait(timeout=10) is not None
    finally:
        stuck.kill()
        stuck.wait()
    assert not is_mounted(share.path)
    assert str(share.path) not in Path("/proc/mounts").read_text()
    assert share.process.poll() is not None


def test_unmount_ends_the_share_even_while_a_process_holds_a_file_open(
    slow_share: SlowShare,
) -> None:
    with subprocess.Popen(
        [*_HOLD, str(slow_share.path / "a.mp4")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"open\n"
            slow_share.unmount(grace_s=0.2)

            assert not is_mounted(slow_share.path)
            assert slow_share.process.poll() is not None
        finally:
            holder.kill()


def test_a_share_whose_owner_dies_unmounts_itself(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    mountpoint = tmp_path / "share"
    with subprocess.Popen(
        [*_OWNER, str(tmp_path / "source"), str(mountpoint)],
        stdout=subprocess.PIPE,
        cwd=_REPOSITORY,
    ) as owner:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert is_mounted(mountpoint)
        owner.send_signal(signal.SIGKILL)  # no teardown runs: the serving process sees stdin end

    deadline = time.monotonic() + 10
    while is_mounted(mountpoint) or _alive(server_pid):
        assert time.monotonic() < deadline, "the orphaned share is still mounted or running"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
