"""The process behind `tests.fusefs`: a FUSE passthrough that is slow, and hangs on request.

Run as ``python fusefs_serve.py SOURCE MOUNTPOINT --delay-s 0.005``; `tests.fusefs.mounted`
starts it and is the only intended user. It serves SOURCE at MOUNTPOINT through libfuse3
(Debian's ``fuse3``) with mfusepy, with the kernel's attribute, name and negative caches off,
so that every ``stat``, lookup and ``readdir`` is a round trip to this process, as on an SMB share.
Every operation first waits while it is hung, then sleeps the delay, then does the
same operation on SOURCE.

It is controlled over stdin and stdout, one JSON object a line each way: it writes
``{"ready": true}`` once the kernel has sent its first request (the mount is live), then answers
each request on stdin with one line. On end of stdin (the parent is done, or died) it lets every
hung operation go, detaches the mount, and serves what is left without delay until the kernel
ends the connection (once nothing uses the detached mount any more).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

_F = TypeVar("_F", bound=Callable[..., Any])
_STAT_FIELDS = (
    "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize",
    "st_rdev",
)  # fmt: skip
_STATVFS_FIELDS = (
    "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
    "f_flag", "f_namemax",
)  # fmt: skip
# No kernel caching of attributes, names or misses: every look-up reaches this process, as every
# look-up on a network share reaches the server. use_ino passes the source's inode numbers
# through, as SMB and NFS report the server's file ids.
MOUNT_OPTIONS: dict[str, Any] = {
    "fsname": "slowshare",
    "attr_timeout": 0,
    "entry_timeout": 0,
    "negative_timeout": 0,
    "use_ino": True,
    "allow_other": True,
}

_FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
_FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags
_FUSE_CAP_READDIRPLUS_AUTO = 1 << 14


class Gate:
    """What every operation passes first: the hung folders, then the delay."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.ops = 0
        self.blocked = 0
        self._hung: set[str] = set()
        self._open = False  # once stdin ends: nothing hangs and nothing is slow any more
        self._changed = threading.Condition()

    def enter(self, operation: str, path: str | None) -> None:
        """Wait while `operation` on `path` is hung, then sleep the delay."""
        with self._changed:
            self.ops += 1
            if path is not None and self._is_hung(operation, path):
                self.blocked += 1
                self._changed.notify_all()
                self._changed.wait_for(lambda: not self._is_hung(operation, path))
                self.blocked -= 1
            delay_s = 0.0 if self._open else self.delay_s
        if delay_s > 0:
            time.sleep(delay_s)

    def _is_hung(self, operation: str, path: str) -> bool:
        # A hung folder itself still answers getattr, which is also how libfuse answers a
        # look-up of its name in the parent: libfuse 3.14 never tells the kernel that look-ups
        # may run in parallel, so the kernel holds the parent's lock through each look-up of a
        # name it does not know yet, and one that hangs would block every such look-up and every
        # listing in the parent (uninterruptibly).
        if self._open:
            return False
        return any(
            path.startswith(top + "/") or (path == top and operation != "getattr")
            for top in self._hung
        )

    def hang(self, path: str) -> None:
        with self._changed:
            self._hung.add(path)

    def release(self, path: str | None) -> None:
        with self._changed:
            if path is None:
                self._hung.clear()
            else:
                self._hung.discard(path)
            self._changed.notify_all()

    def open_all(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def wait_blocked(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.blocked >= count, timeout_s)

    def stats(self) -> dict[str, Any]:
        with self._changed:
            return {"ops": self.ops, "blocked": self.blocked, "delay_s": self.delay_s}


def _gated(method: _F) -> _F:
    """Pass the gate on the operation's path (its first argument) before doing it."""

    def gated(self: Passthrough, path: str | None, *args: Any) -> Any:
        self.gate.enter(method.__name__, path)
        return method(self, path, *args)

    gated.__name__ = method.__name__
    return gated  # type: ignore[return-value]


def _attributes(st: os.stat_result) -> dict[str, Any]:
    attrs: dict[str, Any] = {name: getattr(st, name) for name in _STAT_FIELDS}
    attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
    return attrs


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE, with listings that carry every entry's attributes.

    When the kernel asks for a listing with attributes (READDIRPLUS), every entry comes with
    them, as an SMB or NFS client gets them from one directory listing, and the kernel learns
    the names: a walk that lists a folder and then stats its files pays one round trip per stat,
    not a serialised look-up plus one (see the limits in tests/fusefs.py). mfusepy passes types
    only. Each entry's inode number must not be 0: glibc's readdir skips such entries.
    """

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        # Entries go with offsets (their place + 1): libfuse 3.14 sends the attributes of a
        # READDIRPLUS only then; with offset 0 it buffers the listing and drops them.
        plus = _FUSE_FILL_DIR_PLUS if flags & _FUSE_READDIR_PLUS else 0
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        entries = self.operations.readdir(decoded, fip.contents.fh, offset)
        for place, (name, attrs) in enumerate(entries[offset:], start=offset + 1):
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            if filler(buf, name.encode(self.encoding, self.errors), st, place, plus) != 0:
                break  # the kernel's buffer is full: it asks again from this entry
        return 0


class Passthrough(mfusepy.Operations):  # type: ignore[misc]
    """The folder SOURCE, every operation through the gate first."""

    use_ns = True

    def __init__(self, source: str, gate: Gate, on_ready: Callable[[], None]) -> None:
        self.source = source.rstrip("/")
        self.gate = gate
        self._on_ready = on_ready
        self._handles = itertools.count(1)
        self._listings: dict[int, list[tuple[str, dict[str, Any]]]] = {}

    def _full(self, path: str) -> str:
        return self.source + path

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Every listing with attributes, not only its first chunk (see `_Fuse`).
        conn.want &= ~_FUSE_CAP_READDIRPLUS_AUTO
        self._on_ready()

    @_gated
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if path is None and fh is not None else os.lstat(self._full(path or "/"))
        return _attributes(st)

    @_gated
    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode, follow_symlinks=False):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    @_gated
    def opendir(self, path: str) -> int:
        if not os.path.isdir(self._full(path)):
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return next(self._handles)

    @_gated
    def readdir(self, path: str, fh: int, offset: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """Each entry with its attributes, as an SMB listing gives them (see `_Fuse`).

        The kernel reads a listing a chunk at a time; it is made once, at its start (offset 0,
        also after a rewind), and kept with the open folder until it is closed.
        """
        if offset == 0 or fh not in self._listings:
            full = self._full(path)
            entries = [(".", os.lstat(full)), ("..", os.lstat(os.path.join(full, "..")))]
            with os.scandir(full) as listing:
                entries.extend((e.name, e.stat(follow_symlinks=False)) for e in listing)
            self._listings[fh] = [(name, _attributes(st)) for name, st in entries]
        return self._listings[fh]

    def releasedir(self, path: str | None, fh: int) -> int:
        self._listings.pop(fh, None)
        return 0

    @_gated
    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    @_gated
    def statfs(self, path: str) -> dict[str, int]:
        stv = os.statvfs(self._full(path))
        return {name: getattr(stv, name) for name in _STATVFS_FIELDS}

    @_gated
    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags)

    @_gated
    def create(self, path: str, mode: int, flags: int) -> int:
        return os.open(self._full(path), flags | os.O_CREAT, mode)

    @_gated
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    @_gated
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    @_gated
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path or "/"), length)
        return 0

    @_gated
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        os.fsync(fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        # Not gated: a close has no answer to wait for, and a hung close would leak the fd.
        os.close(fh)
        return 0

    @_gated
    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._full(path), mode)
        return 0

    @_gated
    def rmdir(self, path: str) -> int:
        os.rmdir(self._full(path))
        return 0

    @_gated
    def unlink(self, path: str) -> int:
        os.unlink(self._full(path))
        return 0

    @_gated
    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._full(target))
        return 0

    @_gated
    def link(self, target: str, source: str) -> int:
        os.link(self._full(source), self._full(target))
        return 0

    @_gated
    def rename(self, old: str, new: str) -> int:
        os.rename(self._full(old), self._full(new))
        return 0

    @_gated
    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    @_gated
    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid, follow_symlinks=False)
        return 0

    @_gated
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times, follow_symlinks=False)
        return 0


# Operations served at once, each on a thread of its own. fuse_main of libfuse 3.14 ignores
# -o max_threads and serves at most 10: a few hung operations would stall the whole share, and a
# bench with 16 files in flight would measure this process. So the loop is run here as
# fuse_main runs it, with a larger limit.
MAX_THREADS = 256


class _FuseArgs(ctypes.Structure):
    _fields_ = (
        ("argc", ctypes.c_int),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("allocated", ctypes.c_int),
    )


def _declare(lib: ctypes.CDLL) -> None:
    pointer = ctypes.c_void_p
    for name, restype, argtypes in (
        ("fuse_new_31", pointer, (ctypes.POINTER(_FuseArgs), pointer, ctypes.c_size_t, pointer)),
        ("fuse_mount", ctypes.c_int, (pointer, ctypes.c_char_p)),
        ("fuse_get_session", pointer, (pointer,)),
        ("fuse_set_signal_handlers", ctypes.c_int, (pointer,)),
        ("fuse_remove_signal_handlers", None, (pointer,)),
        ("fuse_loop_cfg_create", pointer, ()),
        ("fuse_loop_cfg_set_max_threads", None, (pointer, ctypes.c_uint)),
        ("fuse_loop_cfg_destroy", None, (pointer,)),
        ("fuse_loop_mt_312", ctypes.c_int, (pointer, pointer)),
        ("fuse_unmount", None, (pointer,)),
        ("fuse_destroy", None, (pointer,)),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


def _main_real(argc: int, argv: Any, operations: Any, size: int, user_data: Any) -> int:
    """fuse_main_real of libfuse 3.14 (foreground, multi-threaded), with MAX_THREADS threads.

    mfusepy calls it with ``fuse [-f] -o OPTIONS MOUNTPOINT``.
    """
    lib = mfusepy._libfuse
    _declare(lib)
    words = [argv[i] for i in range(argc)]
    options = [word for word in words[:-1] if word != b"-f"]
    args = _FuseArgs(len(options), (ctypes.c_char_p * len(options))(*options), 0)
    fuse = lib.fuse_new_31(ctypes.byref(args), operations, size, user_data)
    if not fuse:
        return 2
    if lib.fuse_mount(fuse, words[-1]) != 0:
        lib.fuse_destroy(fuse)
        return 4
    session = lib.fuse_get_session(fuse)
    lib.fuse_set_signal_handlers(session)
    config = lib.fuse_loop_cfg_create()
    lib.fuse_loop_cfg_set_max_threads(config, MAX_THREADS)
    failed = lib.fuse_loop_mt_312(fuse, config)
    lib.fuse_loop_cfg_destroy(config)
    lib.fuse_remove_signal_handlers(session)
    lib.fuse_unmount(fuse)
    lib.fuse_destroy(fuse)
    return 8 if failed else 0


def detach(mountpoint: str) -> None:
    """Unmount lazily: gone from the mount table now, even while operations are stuck in it."""
    if shutil.which("fusermount3"):
        command = ["fusermount3", "-u", "-z", "-q", mountpoint]
    else:
        command = ["umount", "-l", mountpoint]
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Control:
    """Requests on stdin, one answer a line on stdout."""

    def __init__(self, gate: Gate, mountpoint: str) -> None:
        self.gate = gate
        self.mountpoint = mountpoint
        self._out = threading.Lock()

    def say(self, message: dict[str, Any]) -> None:
        with self._out:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def serve(self) -> None:
        for line in sys.stdin:
            try:
                self.say(self.answer(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                self.say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        # The test or bench is done, or died: nothing may stay stuck, and no mount may be left
        # behind. Once the kernel lets go of the detached mount, the loop ends.
        self.gate.open_all()
        detach(self.mountpoint)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "delay":
            self.gate.delay_s = float(request["delay_s"])
        elif op == "hang":
            self.gate.hang(str(request["path"]))
        elif op == "release":
            self.gate.release(request.get("path"))
        elif op == "wait_blocked":
            if not self.gate.wait_blocked(int(request["count"]), float(request["timeout_s"])):
                return {"ok": False, "error": "timeout", **self.gate.stats()}
        elif op != "stats":
            raise ValueError(f"unknown op {op!r}")
        return {"ok": True, **self.gate.stats()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--delay-s", type=float, default=0.005)
    args = parser.parse_args()
    gate = Gate(args.delay_s)
    control = Control(gate, os.path.abspath(args.mountpoint))
    threading.Thread(target=control.serve, name="control", daemon=True).start()
    mfusepy.fuse_main_real = _main_real
    operations = Passthrough(
        os.path.abspath(args.source), gate, on_ready=lambda: control.say({"ready": True})
    )
    _Fuse(operations, args.mountpoint, foreground=True, **MOUNT_OPTIONS)


if __name__ == "__main__":
    main()
