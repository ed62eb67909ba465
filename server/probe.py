"""Media metadata from PyAV, probed in long-lived worker processes.

Each worker is a fresh interpreter (``python -m scanjobs.server.probe_worker``), never a fork of the
server: gRPC does not survive a fork (grpc/grpc#17093). Workers read batches of paths on stdin and
write one framed result per file on stdout, so a file that hangs or crashes FFmpeg costs one
per-file error: the pool kills that worker, replaces it in the background and carries on with
the rest of the batch on another worker. A cancelled probe kills its worker instead of waiting
for it, so cancel latency does not grow with file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import stat
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Protocol

from . import probe_wire as wire
from .fsopen import BY_COMPONENTS_VARIABLE, open_beneath
from .media import MediaInfo, ProbeFailure, ProbeOutcome, ProbeTarget
from .reap import abandon, exited, stop_in_two_stages
from .spawn import Child, start

__all__ = [
    "DEFAULT_PROBE_MEMORY_MIB",
    "MEMORY_VARIABLE",
    "MIN_PROBE_MEMORY_MIB",
    "NO_DECODER",
    "PROBE_COMMAND",
    "THREADS_VARIABLE",
    "MediaInfo",
    "ProbeFailure",
    "ProbeOutcome",
    "ProbePool",
    "ProbeTarget",
    "Prober",
    "probe_file",
    "worker_account",
    "worker_environment",
]

log = logging.getLogger(__name__)

# Demuxers FFmpeg may pick, whatever a file's content claims to be. Playlist and concat
# demuxers (hls, concat, ...) would open other files named inside a file, even outside the
# allowed roots, so they are left out.
DEFAULT_PROBE_MEMORY_MIB = 1024
MIN_PROBE_MEMORY_MIB = 256
# What a worker keeps of the server's environment: what Python and FFmpeg need to run, and
# nothing else. A database URL or a cloud key must never reach a process that parses files an
# attacker may have crafted. (COVERAGE_PROCESS_CONFIG lets the test suite measure workers.)
_WORKER_ENVIRONMENT = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH",
    "COVERAGE_PROCESS_CONFIG", BY_COMPONENTS_VARIABLE,
)  # fmt: skip
MEMORY_VARIABLE = "SCANJOBS_PROBE_MEMORY"  # MiB; a worker limits itself before any file
THREADS_VARIABLE = "SCANJOBS_PROBE_THREADS"  # files of a batch a worker probes at once
# glibc's malloc in a worker: two arenas in all (see probe_worker), and FFmpeg's buffers kept
# between files.
# By default a buffer over 128 KiB is mapped and unmapped for every file, and the heap's top
# is given back after each: about 110 page faults per file, 60% more CPU for a small file.
_MALLOC = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(8 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}
_FORMAT_WHITELIST = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,asf,ogg,h264,hevc,m4v,mjpeg"
)
_OPTIONS = {"format_whitelist": _FORMAT_WHITELIST}
PROBE_COMMAND = (sys.executable, "-m", "scanjobs.server.probe_worker")  # a worker
# The demuxer a name suggests, as FFmpeg names it (the first alias is what av.open takes).
_MOV, _MKV = "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
_FORMAT_BY_SUFFIX = {
    b".mp4": _MOV, b".m4v": _MOV, b".mov": _MOV, b".3gp": _MOV,
    b".mkv": _MKV, b".webm": _MKV,
    b".avi": "avi", b".ts": "mpegts", b".flv": "flv", b".wmv": "asf", b".ogv": "ogg",
}  # fmt: skip
# The demuxers whose headers state all a description needs: each stream and its codec, a
# video's size and frame rate, the duration. For them FFmpeg is let open no decoder
# (``codec_whitelist`` naming none), so its stream-info pass takes what the header says
# instead of decoding frames (up to seven of H.264 and one of AAC, whose decoder alone builds
# its transforms for every file). The description is the same (``tests/test_probe_header.py``
# checks it against the decoding probe); the probe of a small file costs about half, that of a
# 640x360 H.264 file about a thirtieth, and a hostile file meets no decoder. A header that
# leaves a field out (MPEG-4 Part 2 in MP4 keeps its size in the bitstream) is probed again
# with decoders. MPEG-TS, MPEG-PS and FLV state sizes and durations only in their packets.
_HEADER_FORMATS = frozenset({_MOV, _MKV, "avi", "asf"})
NO_DECODER = {"codec_whitelist": "none"}  # the bench's bare loop takes it too


_CRASHED = ProbeFailure("the file crashed the probe worker")


class Prober(Protocol):
    """Probes a batch of files; one outcome per path, in order."""

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]: ...


def probe_file(target: ProbeTarget) -> ProbeOutcome:
    """Probe one file in this process (blocking). Never raises for a bad file."""
    import av

    try:
        fd = _open_verified(target)
        try:
            suffix = os.path.splitext(target.relative)[1].lower()
            return _probe_fd(fd, _FORMAT_BY_SUFFIX.get(suffix))
        finally:
            os.close(fd)
    except _Swapped:
        return ProbeFailure("the file changed between walk and probe; it was not read")
    except FileNotFoundError:
        return ProbeFailure("file disappeared before it was probed")
    except PermissionError:
        return ProbeFailure("permission denied")
    except MemoryError:
        return ProbeFailure("the probe ran out of memory (--probe-memory)")
    except (av.FFmpegError, OSError, ValueError, UnicodeError) as exc:
        return ProbeFailure(f"not a readable video: {_short(exc)}")


def _probe_fd(fd: int, expected: str | None) -> MediaInfo:
    """Describe the open file ``fd``, trying the demuxer its name suggests first."""
    import av

    # FFmpeg reads natively through /proc/self/fd: the very file that was verified, whatever
    # the name points to by now (a Python file object would be ~10% slower).
    url = f"/proc/self/fd/{fd}"
    if expected is not None:
        # Naming the demuxer skips FFmpeg's format detection, the dearest part of a probe of
        # a small file; a file whose name lies is detected among the whitelisted formats.
        name = expected.split(",")[0]
        try:
            if expected in _HEADER_FORMATS:
                with av.open(url, format=name, options=NO_DECODER) as container:
                    info = _describe(container, expected)
                if _stated_in_full(info):
                    return info
            with av.open(url, format=name) as container:
                return _describe(container, expected)
        except av.FFmpegError:
            pass
    with av.open(url, options=_OPTIONS) as container:
        return _describe(container, container.format.name)


def _stated_in_full(info: MediaInfo) -> bool:
    """Whether a description read from the header alone lacks nothing a decoder could add."""
    video = not info.video_codec or (info.width > 0 and info.height > 0 and info.frame_rate)
    return bool(video) and info.duration_s is not None


class _Swapped(Exception):
    """What the walk vetted is no longer what the name points to."""


def _open_verified(target: ProbeTarget) -> int:
    """A descriptor of the file the walk vetted (same device and inode), or _Swapped."""
    root_fd = os.open(target.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Beneath the root, no symlink followed: a folder on the way swapped for a symlink
        # is ELOOP, not a way out. O_NONBLOCK: a FIFO swapped in must not hang the worker.
        fd = open_beneath(root_fd, target.relative, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            raise _Swapped from None
        raise
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (target.device, target.inode) or not stat.S_ISREG(st.st_mode):
            raise _Swapped
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _describe(container: object, format_name: str) -> MediaInfo:
    import av

    assert isinstance(container, av.container.InputContainer)  # noqa: S101 - narrows the type
    video: av.VideoStream | None = None
    audio: av.AudioStream | None = None
    counts = {"audio": 0, "subtitle": 0, "data": 0}
    for stream in container.streams:  # one pass: each accessor builds a new tuple
        kind = stream.type
        if kind == "video" and video is None:
            video = stream  # type: ignore[assignment]
        elif kind in counts:
            counts[kind] += 1
            if kind == "audio" and audio is None:
                audio = stream  # type: ignore[assignment]
    name, width, height, rate = "", 0, 0, None
    if video is not None:
        name, width, height = video.codec_context.name, video.width or 0, video.height or 0
        rate = video.average_rate or video.guessed_rate
    duration = container.duration
    return MediaInfo(
        container=format_name,
        duration_s=duration / av.time_base if duration else None,
        bit_rate=int(container.bit_rate or 0),
        video_codec=name,
        width=width,
        height=height,
        frame_rate=Fraction(rate) if rate else None,
        audio_codec=audio.codec_context.name if audio is not None else "",
        audio_streams=counts["audio"],
        subtitle_streams=counts["subtitle"],
        data_streams=counts["data"],
    )


def _short(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- the pool ----------------------------------------------------------------------------

_READ_BYTES = 1 << 16  # of outcomes, per read from a worker's pipe


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: Child) -> None:
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self._inbox = bytearray()  # read from the worker, not yet a whole reply

    async def send(self, targets: Sequence[ProbeTarget]) -> None:
        self.stdin.write(wire.encode_targets(tuple(targets)))
        await self.stdin.drain()

    async def receive(self) -> tuple[ProbeOutcome, float]:
        """The next outcome and its probe's seconds; raises wire.BadReply before reading an
        oversized payload.

        The worker writes its outcomes several at a time: one read takes them all in, and
        the ones after the first are then answered without waiting.
        """
        inbox, head = self._inbox, wire.FRAME.size
        while True:
            if len(inbox) >= head:
                (size,) = wire.FRAME.unpack_from(inbox)
                wire.check_size(size)
                if len(inbox) >= head + size:
                    payload = bytes(inbox[head : head + size])
                    del inbox[: head + size]
                    return wire.decode_reply(payload)
            chunk = await self.stdout.read(_READ_BYTES)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(inbox), None)
            inbox += chunk

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class _Watchdog:
    """Cancels the current task when no file finished for ``limit_s`` seconds.

    One timer per batch, re-armed only when it fires: marking progress is a float store,
    where moving a timeout after every file showed up in the server's profile. (Not
    ``asyncio.wait_for``, which on Python 3.11 can swallow a cancel that arrives as the reply
    does.)
    """

    def __init__(self, limit_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._limit_s = limit_s
        self._last = self._loop.time()
        self._fired = False
        self._handle = self._loop.call_at(self._last + limit_s, self._check)

    def progress(self) -> None:
        """A file finished: its successor gets the full limit."""
        self._last = self._loop.time()

    def timed_out(self) -> bool:
        """True if the cancel being handled is ours and no other cancel is pending."""
        return self._fired and self._task is not None and self._task.uncancel() == 0

    def stop(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        due = self._last + self._limit_s
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self._fired = True
            self._task.cancel()


class ProbePool:
    """A fixed number of probe worker processes shared by all jobs.

    Args:
        processes: worker processes (at least 1).
        probe_timeout_s: longest time one file may take; then it is a per-file error and its
            worker is replaced.
        command: the worker's command line; by default this module run by this interpreter.
        on_probe: called with the seconds each file took (metrics).
        memory_mib: each worker's address-space limit (``RLIMIT_AS``), in MiB; 0 for none.
        user: run the workers as this user (a name or a uid) and its primary group, with no
            supplementary groups; the server must start as root for that.
        threads: files of a batch each worker probes at once (``--io-concurrency``) while
            its files wait on storage: PyAV releases the GIL while it reads, so a worker keeps
            that many reads in flight on slow storage. Files that do not wait are probed one
            at a time. Outcomes still come back in order.

    Workers start with a clean environment (:func:`worker_environment`).

    Raises:
        KeyError: ``user`` is not a known user.
    """

    def __init__(
        self,
        processes: int,
        probe_timeout_s: float = 30.0,
        *,
        command: Sequence[str] = PROBE_COMMAND,
        on_probe: Callable[[float], None] | None = None,
        memory_mib: int = DEFAULT_PROBE_MEMORY_MIB,
        user: str | None = None,
        threads: int = 1,
    ) -> None:
        self._memory_mib = memory_mib
        self._threads = max(1, threads)
        self._account: dict[str, Any] = {}
        if user is not None:
            uid, gid = worker_account(user)
            self._account = {"user": uid, "group": gid, "extra_groups": []}
        self._on_probe = on_probe
        self._command = tuple(command)
        self._size = max(1, processes)
        self._timeout_s = probe_timeout_s
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._spawning: set[asyncio.Task[None]] = set()
        self._all: set[_Worker] = set()
        self._closed = False

    async def start(self) -> None:
        """Start every worker and wait until they are ready."""
        await asyncio.gather(*(self._spawn() for _ in range(self._size)))

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop every worker in two stages and reap it; idempotent.

        Each worker's input is closed, so that an idle one exits at once; after ``grace_s``
        seconds the ones still running (a probe in flight) are killed, and logged. Returns
        when every worker process has been reaped, or abandoned (logged) when, killed, it
        did not exit within ``reap.KILL_WAIT_S``: stuck in the kernel on a dead share.
        """
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        # A killed worker stuck in the kernel (a read on a dead share) is abandoned, not
        # waited for: the scan worker above must exit when told to.
        for proc in await stop_in_two_stages(list(self._all), grace_s, "probe workers"):
            abandon(proc, "probe worker")
        self._all.clear()

    @property
    def background_tasks(self) -> int:
        """Replacement spawns still under way (0 once idle or closed)."""
        return len(self._spawning)

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        """Probe ``targets`` on one worker; a file that hangs or crashes it is a per-file error.

        A worker writes its outcomes a few milliseconds apart, so one that crashed may have
        probed files whose outcomes never came: the rest of that batch goes one file at a
        time until the crash comes again, and only the file that crashed a worker alone is
        a failure.
        """
        outcomes: list[ProbeOutcome] = []
        alone = 0  # files still to probe one at a time, after a crash
        while len(outcomes) < len(targets):
            worker = await self._idle.get()
            rest = targets[len(outcomes) : len(outcomes) + 1] if alone else targets[len(outcomes) :]
            before = len(outcomes)
            ok = await self._run_batch(worker, rest, outcomes)
            if ok:
                self._idle.put_nowait(worker)
                alone = max(0, alone - 1)
                continue
            self._replace(worker)
            if outcomes[-1] == _CRASHED and len(outcomes) - before < len(rest):
                outcomes.pop()  # perhaps not this file: its outcome may have been lost
                alone = len(rest) - (len(outcomes) - before)
            else:
                alone = max(0, alone - 1)
        return outcomes

    async def _run_batch(
        self, worker: _Worker, targets: Sequence[ProbeTarget], outcomes: list[ProbeOutcome]
    ) -> bool:
        """Probe on ``worker``, appending to ``outcomes``; False when the worker must go."""
        watchdog = _Watchdog(self._timeout_s)
        try:
            await worker.send(targets)
            for _ in targets:
                outcome, seconds = await worker.receive()
                outcomes.append(outcome)
                watchdog.progress()
                if self._on_probe is not None:
                    self._on_probe(seconds)
        except asyncio.CancelledError:
            if not watchdog.timed_out():
                # Abort the probe in flight rather than wait for it: latency must not grow
                # with file size.
                self._replace(worker)
                raise
            outcomes.append(ProbeFailure(f"probe took longer than {self._timeout_s:g} s"))
            return False
        except wire.BadReply as exc:  # the worker is not ours any more: replace it
            outcomes.append(ProbeFailure(str(exc)))
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            outcomes.append(_CRASHED)
            return False
        finally:
            watchdog.stop()
        return True

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        if self._closed:
            return
        task = asyncio.create_task(self._respawn(worker))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self, dead: _Worker) -> None:
        # The replacement first: a killed worker stuck in the kernel may never exit.
        await self._spawn()
        if not await exited(dead.proc):
            abandon(dead.proc, "probe worker")
        self._all.discard(dead)

    async def _spawn(self) -> None:
        proc = await start(
            self._command,
            env={
                **worker_environment(),
                MEMORY_VARIABLE: str(self._memory_mib),
                THREADS_VARIABLE: str(self._threads),
                **_MALLOC,
            },
            **self._account,
        )
        worker = _Worker(proc)
        self._all.add(worker)
        if self._closed:
            worker.kill()
            return
        self._idle.put_nowait(worker)


def worker_environment() -> dict[str, str]:
    """The environment a probe worker starts with: the server's, minus anything not needed."""
    return {name: os.environ[name] for name in _WORKER_ENVIRONMENT if name in os.environ}


def worker_account(user: str) -> tuple[int, int]:
    """The uid and primary gid of ``user`` (a name or a numeric uid).

    Raises:
        KeyError: no such user.
    """
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
