"""Media metadata from PyAV, probed in long-lived worker processes.

Each worker is a fresh interpreter (``python -m scanjobs.server.probe``), never a fork of the
server: gRPC does not survive a fork (grpc/grpc#17093). Workers read batches of paths on stdin and
write one framed result per file on stdout, so a file that hangs or crashes FFmpeg costs one
per-file error: the pool kills that worker, replaces it in the background and carries on with
the rest of the batch on another worker. A cancelled probe kills its worker instead of waiting
for it, so cancel latency does not grow with file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import stat
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Protocol

__all__ = [
    "MediaInfo",
    "ProbeFailure",
    "ProbeOutcome",
    "ProbePool",
    "ProbeTarget",
    "Prober",
    "probe_file",
]

log = logging.getLogger(__name__)

# Demuxers FFmpeg may pick, whatever a file's content claims to be. Playlist and concat
# demuxers (hls, concat, ...) would open other files named inside a file, even outside the
# allowed roots, so they are left out.
_FORMAT_WHITELIST = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,asf,ogg,h264,hevc,m4v,mjpeg"
)
_OPTIONS = {"format_whitelist": _FORMAT_WHITELIST}
# The demuxer a name suggests, as FFmpeg names it (the first alias is what av.open takes).
_MOV, _MKV = "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
_FORMAT_BY_SUFFIX = {
    b".mp4": _MOV, b".m4v": _MOV, b".mov": _MOV, b".3gp": _MOV,
    b".mkv": _MKV, b".webm": _MKV,
    b".avi": "avi", b".ts": "mpegts", b".flv": "flv", b".wmv": "asf", b".ogv": "ogg",
}  # fmt: skip
_FRAME = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What a probe learns about one file. Zero / empty means unknown or absent."""

    container: str
    duration_s: float | None
    bit_rate: int
    video_codec: str
    width: int
    height: int
    frame_rate: Fraction | None
    audio_codec: str
    audio_streams: int
    subtitle_streams: int
    data_streams: int


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """A file to probe, and the identity (device, inode) the walk saw for it.

    The worker probes the file only if what it opens is that very file: a name swapped for a
    symlink, a FIFO or another file between walk and probe is refused, never read.
    """

    path: bytes
    device: int
    inode: int


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """A file that could not be probed, and why, in words fit for a caller."""

    message: str


ProbeOutcome = MediaInfo | ProbeFailure


class Prober(Protocol):
    """Probes a batch of files; one outcome per path, in order."""

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]: ...


def probe_file(target: ProbeTarget) -> ProbeOutcome:
    """Probe one file in this process (blocking). Never raises for a bad file."""
    import av

    try:
        fd = _open_verified(target)
        try:
            return _probe_fd(fd, _FORMAT_BY_SUFFIX.get(os.path.splitext(target.path)[1].lower()))
        finally:
            os.close(fd)
    except _Swapped:
        return ProbeFailure("the file changed between walk and probe; it was not read")
    except FileNotFoundError:
        return ProbeFailure("file disappeared before it was probed")
    except PermissionError:
        return ProbeFailure("permission denied")
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
        try:
            with av.open(url, format=expected.split(",")[0]) as container:
                return _describe(container, expected)
        except av.FFmpegError:
            pass
    with av.open(url, options=_OPTIONS) as container:
        return _describe(container, container.format.name)


class _Swapped(Exception):
    """What the walk vetted is no longer what the name points to."""


def _open_verified(target: ProbeTarget) -> int:
    """A descriptor of the file the walk vetted (same device and inode), or _Swapped."""
    # O_NONBLOCK: opening a FIFO swapped in since the walk must not hang the worker.
    fd = os.open(target.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
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


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    async def send(self, targets: Sequence[ProbeTarget]) -> None:
        payload = pickle.dumps([(t.path, t.device, t.inode) for t in targets])
        self.stdin.write(_FRAME.pack(len(payload)) + payload)
        await self.stdin.drain()

    async def receive(self) -> ProbeOutcome:
        (size,) = _FRAME.unpack(await self.stdout.readexactly(_FRAME.size))
        return _from_wire(pickle.loads(await self.stdout.readexactly(size)))  # noqa: S301 - our child

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

    def progress(self) -> float:
        """A file finished: its successor gets the full limit. Returns the file's seconds."""
        now = self._loop.time()
        elapsed, self._last = now - self._last, now
        return elapsed

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
    """

    def __init__(
        self,
        processes: int,
        probe_timeout_s: float = 30.0,
        *,
        command: Sequence[str] = (sys.executable, "-m", "scanjobs.server.probe"),
        on_probe: Callable[[float], None] | None = None,
    ) -> None:
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
        only when every worker process has been reaped: none is left behind.
        """
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        workers = list(self._all)
        for worker in workers:
            worker.stdin.close()
        exits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
        if exits:
            await asyncio.wait(exits, timeout=grace_s)
        stubborn = [w for w in workers if w.proc.returncode is None]
        if stubborn:
            log.warning(
                "killed probe workers still running after the grace period",
                extra={"pids": [w.proc.pid for w in stubborn]},
            )
        for worker in stubborn:
            worker.kill()
        await asyncio.gather(*exits, return_exceptions=True)
        self._all.clear()

    @property
    def background_tasks(self) -> int:
        """Replacement spawns still under way (0 once idle or closed)."""
        return len(self._spawning)

    async def probe(self, targets: Sequence[ProbeTarget]) -> list[ProbeOutcome]:
        """Probe ``targets`` on one worker; a file that hangs or crashes it is a per-file error."""
        outcomes: list[ProbeOutcome] = []
        while len(outcomes) < len(targets):
            worker = await self._idle.get()
            ok = await self._run_batch(worker, targets[len(outcomes) :], outcomes)
            if ok:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)
        return outcomes

    async def _run_batch(
        self, worker: _Worker, targets: Sequence[ProbeTarget], outcomes: list[ProbeOutcome]
    ) -> bool:
        """Probe on ``worker``, appending to ``outcomes``; False when the worker must go."""
        watchdog = _Watchdog(self._timeout_s)
        try:
            await worker.send(targets)
            for _ in targets:
                outcomes.append(await worker.receive())
                elapsed = watchdog.progress()
                if self._on_probe is not None:
                    self._on_probe(elapsed)
        except asyncio.CancelledError:
            if not watchdog.timed_out():
                # Abort the probe in flight rather than wait for it: latency must not grow
                # with file size.
                self._replace(worker)
                raise
            outcomes.append(ProbeFailure(f"probe took longer than {self._timeout_s:g} s"))
            return False
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, pickle.PickleError):
            outcomes.append(ProbeFailure("the file crashed the probe worker"))
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
        await dead.proc.wait()
        self._all.discard(dead)
        await self._spawn()

    async def _spawn(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = _Worker(proc)
        self._all.add(worker)
        if self._closed:
            worker.kill()
            return
        self._idle.put_nowait(worker)


# Outcomes cross the pipe as plain tuples: unpickling frozen slotted dataclasses (and
# Fractions) runs Python code per object, which showed up in the server's profile.
_Wire = tuple[str, tuple[object, ...]]


def _to_wire(outcome: ProbeOutcome) -> _Wire:
    if isinstance(outcome, ProbeFailure):
        return ("failure", (outcome.message,))
    rate = outcome.frame_rate
    return (
        "info",
        (outcome.container, outcome.duration_s, outcome.bit_rate, outcome.video_codec,
         outcome.width, outcome.height, rate.numerator if rate else 0,
         rate.denominator if rate else 0, outcome.audio_codec, outcome.audio_streams,
         outcome.subtitle_streams, outcome.data_streams),
    )  # fmt: skip


def _from_wire(message: object) -> ProbeOutcome:
    match message:
        case ("failure", (str() as text,)):
            return ProbeFailure(text)
        case ("info", (c, d, b, vc, w, h, int() as num, int() as den, ac, an, sn, dn)):
            rate = Fraction(num, den) if den else None
            return MediaInfo(c, d, b, vc, w, h, rate, ac, an, sn, dn)  # type: ignore[arg-type]
    raise ValueError("probe worker sent an unexpected message")


# -- the worker process --------------------------------------------------------------------


def _serve(
    stdin: BinaryIO,
    stdout: BinaryIO,
    probe: Callable[[ProbeTarget], ProbeOutcome] = probe_file,
) -> None:
    """Worker main loop: read batches, write one framed outcome per file."""
    import av

    av.logging.set_level(None)
    while True:
        header = stdin.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return  # the server closed our stdin or died
        (size,) = _FRAME.unpack(header)
        batch: list[tuple[bytes, int, int]] = pickle.loads(stdin.read(size))  # noqa: S301
        for path, device, inode in batch:
            payload = pickle.dumps(_to_wire(probe(ProbeTarget(path, device, inode))))
            stdout.write(_FRAME.pack(len(payload)) + payload)
            stdout.flush()


if __name__ == "__main__":
    # Run the copy imported under its real name, so that pickled outcomes name
    # ``server.probe.MediaInfo`` rather than ``__main__.MediaInfo``.
    from . import probe

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        probe._serve(sys.stdin.buffer, sys.stdout.buffer)
