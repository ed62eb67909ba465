"""A slow network share that can go dead, for tests and the bench: FUSE over a local folder.

``mounted(source, mountpoint, delay_s=0.005)`` serves the folder `source` at `mountpoint`
through FUSE (Debian's ``fuse3``, driven by ``tests/fusefs_serve.py`` in a process of its own)
and unmounts it on exit. Every filesystem operation on the mount takes at least `delay_s`, and
the kernel caches neither attributes nor names, so that a walk or a probe pays a round trip per
``stat``, look-up, ``readdir`` and ``read``, as on an SMB share over a network. ``hang("x/y")``
makes the folder ``x/y`` go dead, as a share whose server stopped answering, until
``release()``: every operation below it blocks, and so does every operation on the folder itself
but a ``stat`` (listing or opening it blocks); the rest of the mount keeps answering::

    with mounted(library, tmp_path / "share") as share:
        share.hang("dead")
        ...  # something walks share.path and gets stuck in share.path / "dead"
        share.wait_blocked(1)  # an operation is now stuck in there
        share.release()

The mount is served by another process, so an operation stuck in it blocks only the thread that
made it, never this module's control calls. Unmounting detaches the mount at once, even with
operations stuck in it (they are let go), and ends the serving process; so does the serving
process itself when its owner dies.

A listing carries every entry's attributes (READDIRPLUS, as an SMB listing does), so the kernel
learns the names it lists. That matters because of a limit of Debian's libfuse 3.14: it never
tells the kernel that directory operations may run in parallel, so the kernel runs the look-up
of a name it does not know yet, and each listing, one at a time per folder, under a lock that a
waiting process cannot be killed out of. Look-ups of known names (every later ``stat``: with the
caches off they are revalidated) run in parallel. At 5 ms, 16 threads ``stat`` 400 files of one
folder at about 170/s when the names are new, about 1,300/s after a listing of the folder, and
about 1,400/s the second time. At most 256 operations are served at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.media import write_video

__all__ = [
    "DEFAULT_DELAY_S",
    "SHARE_VIDEOS",
    "FuseError",
    "ShareStats",
    "SlowShare",
    "fuse_unavailable",
    "is_mounted",
    "mounted",
    "slow_share",
]

DEFAULT_DELAY_S = 0.005
_SERVE = Path(__file__).resolve().with_name("fusefs_serve.py")
_EXIT_GRACE_S = 3.0  # after the unmount, for the serving process to see the kernel let go
# The library of the `slow_share` fixture: two good folders, and `dead` to hang.
SHARE_VIDEOS = ("a.mp4", "shows/b.mkv", "dead/c.mp4", "dead/deeper/d.mp4")


class FuseError(RuntimeError):
    """The share could not be mounted, or its serving process did not answer."""


@dataclasses.dataclass(frozen=True, slots=True)
class ShareStats:
    """Counters of the serving process.

    Attributes:
        ops: filesystem operations received since the mount (including blocked ones).
        blocked: operations blocked in a hung folder right now.
        delay_s: the delay added to each operation.
    """

    ops: int
    blocked: int
    delay_s: float


def fuse_unavailable() -> str | None:
    """Why this machine cannot mount a FUSE filesystem, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent: this machine (or container) cannot mount FUSE filesystems"
    return None


def is_mounted(path: Path) -> bool:
    """Whether `path` is a mount point, read from the mount table: never touches the mount."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as table:
        return any(_unescape(line.split()[4]) == target for line in table)


def _unescape(field: bytes) -> bytes:
    # The mount table writes space, tab, newline and backslash as octal escapes (\040 ...).
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


class SlowShare:
    """A mounted share: its path, and the controls of its serving process.

    Every method is safe to call from any thread, also while operations are stuck in the mount.
    """

    def __init__(self, process: subprocess.Popen[bytes], source: Path, path: Path) -> None:
        self.process = process
        self.source = source
        self.path = path
        self._lock = threading.Lock()
        self._pending = b""
        self._unmounted = False

    def set_delay(self, delay_s: float) -> None:
        """Make every operation from now on take at least `delay_s` seconds (0: no delay)."""
        self._request({"op": "delay", "delay_s": delay_s})

    def hang(self, relative: str | Path) -> None:
        """Make the folder `relative` (to the mount's root) go dead from now on.

        Every operation on a path below it blocks; on the folder itself, every operation but
        getattr (``stat``, and the look-up of its name) blocks: opening or listing it. The
        parent folder still lists it. The folder itself answers ``stat`` because libfuse 3.14
        makes the kernel serialise the look-ups of new names and the listings within a folder,
        under a lock that a waiting process cannot be killed out of: a hung look-up of the
        folder's name would block the parent. Below the hung folder that does happen: while a
        look-up of a name the kernel has not seen yet (or a listing) is blocked in a folder
        there, other look-ups of new names and listings in that same folder wait for it in
        uninterruptible sleep (state D) until `release` or `unmount`, and cannot be killed.
        An operation that already passed its check is not caught.
        """
        self._request({"op": "hang", "path": _inside(relative)})

    def release(self, relative: str | Path | None = None) -> None:
        """Let the operations blocked on `relative` (every hung folder when None) go on."""
        self._request({"op": "release", "path": None if relative is None else _inside(relative)})

    def wait_blocked(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Return once at least `count` operations are blocked in hung folders.

        Raises:
            TimeoutError: fewer were blocked after `timeout_s` seconds.
        """
        answer = self._request(
            {"op": "wait_blocked", "count": count, "timeout_s": timeout_s},
            timeout_s=timeout_s + 5.0,
            check=False,
        )
        if not answer["ok"]:
            raise TimeoutError(
                f"{answer['blocked']} operations blocked after {timeout_s} s, not {count}"
            )

    def stats(self) -> ShareStats:
        """The serving process's counters now."""
        answer = self._request({"op": "stats"})
        return ShareStats(ops=answer["ops"], blocked=answer["blocked"], delay_s=answer["delay_s"])

    def unmount(self, grace_s: float = _EXIT_GRACE_S) -> None:
        """Detach the mount and end the serving process. Idempotent.

        Works with operations stuck in the mount: the detach is lazy (the mount leaves the
        mount table at once), then the serving process lets every blocked operation go and
        exits once the kernel lets go of the mount; if something still holds it (an open file,
        a working directory) after `grace_s` seconds, the process is killed, which fails
        whatever is still in flight with ENOTCONN.
        """
        with self._lock:
            if self._unmounted:
                return
            self._unmounted = True
        _detach(self.path)
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdout.close()  # type: ignore[union-attr]
        if is_mounted(self.path):
            _detach(self.path)

    def _wait_ready(self, timeout_s: float) -> None:
        """Return once the kernel has sent the mount's first request: the mount is live."""
        try:
            answer = self._read_line(timeout_s)
        except FuseError as exc:
            raise FuseError(
                f"{exc}; the FUSE mount did not come up (is Debian's fuse3 installed? "
                "see the share's stderr above)"
            ) from None
        if not answer.get("ready"):
            raise FuseError(f"the share said {answer} instead of being ready")

    def _request(
        self, request: dict[str, Any], timeout_s: float = 10.0, *, check: bool = True
    ) -> dict[str, Any]:
        with self._lock:
            if self._unmounted:
                raise FuseError(f"{self.path} is unmounted")
            stdin = self.process.stdin
            assert stdin is not None
            try:
                stdin.write(json.dumps(request).encode() + b"\n")
                stdin.flush()
            except BrokenPipeError:
                code = self.process.poll()
                raise FuseError(f"the share serving {self.path} exited (status {code})") from None
            answer = self._read_line(timeout_s)
        if check and not answer.get("ok"):
            raise FuseError(f"the share refused {request}: {answer.get('error')}")
        return answer

    def _read_line(self, timeout_s: float) -> dict[str, Any]:
        """One JSON line from the serving process, within `timeout_s` seconds."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            left_s = deadline - time.monotonic()
            if left_s <= 0 or not select.select([stdout], [], [], left_s)[0]:
                raise FuseError(f"the share serving {self.path} did not answer in {timeout_s} s")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                code = self.process.poll()
                raise FuseError(f"the share serving {self.path} exited (status {code})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer


def _inside(relative: str | Path) -> str:
    """A path relative to the mount's root as FUSE names it: "/a/b"."""
    parts = [part for part in Path(relative).parts if part != "."]
    if Path(relative).is_absolute() or ".." in parts or not parts:
        raise ValueError(f"{relative!r} is not a path inside the share")
    return "/" + "/".join(parts)


def _detach(mountpoint: Path) -> None:
    """Lazily unmount: gone from the mount table now, even while operations are stuck in it."""
    if shutil.which("fusermount3"):
        command = ["fusermount3", "-u", "-z", "-q", str(mountpoint)]
    else:
        command = ["umount", "-l", str(mountpoint)]
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _environment() -> dict[str, str]:
    # The serving process is not code under test: keep coverage's subprocess hook out of it.
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


@contextlib.contextmanager
def mounted(
    source: Path,
    mountpoint: Path,
    *,
    delay_s: float = DEFAULT_DELAY_S,
    ready_timeout_s: float = 15.0,
) -> Iterator[SlowShare]:
    """Serve the folder `source` at `mountpoint` (created if missing) while the block runs.

    Args:
        source: the folder whose files the share shows; changes to it show at once.
        mountpoint: an empty folder to mount on.
        delay_s: the least time each filesystem operation takes, in seconds.
        ready_timeout_s: how long to wait for the mount to answer.

    Raises:
        FuseError: the mount did not come up (is Debian's fuse3 installed?).
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    mountpoint.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(_SERVE), str(source.resolve()), str(mountpoint), "--delay-s",
         str(delay_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_environment(),
    )  # fmt: skip
    share = SlowShare(process, source, mountpoint)
    try:
        share._wait_ready(ready_timeout_s)
        yield share
    finally:
        share.unmount()


@pytest.fixture
def slow_share(tmp_path: Path) -> Iterator[SlowShare]:
    """A mounted share of real videos (`SHARE_VIDEOS`), 5 ms an operation, nothing hung yet.

    ``slow_share.path`` is the mount, ``slow_share.source`` the folder behind it. Unmounted
    after the test, also with operations stuck in it. Skips only where /dev/fuse is absent.
    """
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    source = tmp_path / "share-source"
    for name in SHARE_VIDEOS:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(source / name, container="matroska" if name.endswith(".mkv") else None)
    with mounted(source, tmp_path / "share") as share:
        yield share
