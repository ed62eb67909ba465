"""Media metadata from PyAV, probed in long-lived worker processes.

Each worker is a fresh interpreter (``python -m server.probe``), never a fork of the server:
gRPC does not survive a fork (grpc/grpc#17093). Workers read batches of paths on stdin and
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
        with (
            _open_verified(target) as raw,
            av.open(raw, options={"format_whitelist": _FORMAT_WHITELIST}) as container,
        ):
            return _describe(container)
    except _Swapped:
        return ProbeFailure("the file changed between walk and probe; it was not read")
    except FileNotFoundError:
        return ProbeFailure("file disappeared before it was probed")
    except PermissionError:
        return ProbeFailure("permission denied")
    except (av.FFmpegError, OSError, ValueError, UnicodeError) as exc:
        return ProbeFailure(f"not a readable video: {_short(exc)}")


class _Swapped(Exception):
    """What the walk vetted is no longer what the name points to."""


def _open_verified(target: ProbeTarget) -> BinaryIO:
    # O_NONBLOCK: opening a FIFO swapped in since the walk must not hang the worker.
    fd = os.open(target.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (target.device, target.inode) or not stat.S_ISREG(st.st_mode):
            raise _Swapped
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _describe(container: object) -> MediaInfo:
    import av

    assert isinstance(container, av.container.InputContainer)  # noqa: S101 - narrows the type
    streams = container.streams
    video = streams.video[0] if streams.video else None
    audio = streams.audio[0] if streams.audio else None
    rate = (video.average_rate or video.guessed_rate) if video is not None else None
    return MediaInfo(
        container=container.format.name,
        duration_s=container.duration / av.time_base if container.duration else None,
        bit_rate=int(container.bit_rate or 0),
        video_codec=video.codec_context.name if video is not None else "",
        width=int(video.codec_context.width or 0) if video is not None else 0,
        height=int(video.codec_context.height or 0) if video is not None else 0,
        frame_rate=Fraction(rate) if rate else None,
        audio_codec=audio.codec_context.name if audio is not None else "",
        audio_streams=len(streams.audio),
        subtitle_streams=len(streams.subtitles),
        data_streams=len(streams.data),
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
        payload = pickle.dumps(list(targets))
        self.stdin.write(_FRAME.pack(len(payload)) + payload)
        await self.stdin.drain()

    async def receive(self) -> ProbeOutcome:
        (size,) = _FRAME.unpack(await self.stdout.readexactly(_FRAME.size))
        outcome = pickle.loads(await self.stdout.readexactly(size))  # noqa: S301 - our own child
        if not isinstance(outcome, MediaInfo | ProbeFailure):
            raise RuntimeError("probe worker sent an unexpected message")
        return outcome

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class ProbePool:
    """A fixed number of probe worker processes shared by all jobs.

    Args:
        processes: worker processes (at least 1).
        probe_timeout_s: longest time one file may take; then it is a per-file error and its
            worker is replaced.
        command: the worker's command line; by default this module run by this interpreter.
    """

    def __init__(
        self,
        processes: int,
        probe_timeout_s: float = 30.0,
        *,
        command: Sequence[str] = (sys.executable, "-m", "server.probe"),
    ) -> None:
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

    async def close(self) -> None:
        """Kill every worker and reap it; idempotent."""
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        for worker in list(self._all):
            worker.kill()
        await asyncio.gather(*(w.proc.wait() for w in self._all), return_exceptions=True)
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
        try:
            await worker.send(targets)
            for _ in targets:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                # that arrives just as the reply does, and the job would run on.
                async with asyncio.timeout(self._timeout_s):
                    outcomes.append(await worker.receive())
        except TimeoutError:
            outcomes.append(ProbeFailure(f"probe took longer than {self._timeout_s:g} s"))
            return False
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError, pickle.PickleError):
            outcomes.append(ProbeFailure("the file crashed the probe worker"))
            return False
        except asyncio.CancelledError:
            # Abort the probe in flight rather than wait for it: latency must not grow with size.
            self._replace(worker)
            raise
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
        targets: list[ProbeTarget] = pickle.loads(stdin.read(size))  # noqa: S301 - our server
        for target in targets:
            payload = pickle.dumps(probe(target))
            stdout.write(_FRAME.pack(len(payload)) + payload)
            stdout.flush()


if __name__ == "__main__":
    # Run the copy imported under its real name, so that pickled outcomes name
    # ``server.probe.MediaInfo`` rather than ``__main__.MediaInfo``.
    from server import probe

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        probe._serve(sys.stdin.buffer, sys.stdout.buffer)
