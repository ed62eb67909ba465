"""What the service is measured against, each run in the same process and on the same files:
one ffprobe per file (the seed project's approach), a bare PyAV loop in worker processes,
and the file-system floors."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.harness import free_port

VIDEO = (b".mp4", b".mkv", b".avi", b".mov", b".webm", b".m4v")


def video_files(root: Path) -> list[bytes]:
    """Every video file below ``root``, as the service would find it."""
    return [p for p in _walk(os.fsencode(root)) if p.lower().endswith(VIDEO)]


def _walk(root: bytes) -> Iterator[bytes]:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry.path


def ensure_ffprobe() -> str | None:
    """The ffprobe binary, installing Debian's ffmpeg when it is missing (as root)."""
    found = shutil.which("ffprobe")
    if found or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "ffmpeg"], check=False, env=env, capture_output=True
    )
    return shutil.which("ffprobe")


def ffprobe_rate(ffprobe: str, files: list[bytes], sample: int) -> float:
    """Files per second with one ``ffprobe -show_format -show_streams`` process per file."""
    chosen = files[:sample]
    started = time.perf_counter()
    for path in chosen:
        subprocess.run(
            [ffprobe, "-v", "quiet", "-print_format", "json", "-show_format", "-show_streams",
             os.fsdecode(path)],
            capture_output=True, check=False,
        )  # fmt: skip
    return len(chosen) / (time.perf_counter() - started)


def probe_one(path: bytes, options: dict[str, str] | None = None) -> bool:
    """What the bare PyAV loops do per file: open it, read its streams; False if it fails."""
    import av

    try:
        with av.open(os.fsdecode(path), options=options) as container:
            _ = [(s.type, s.codec_context.name) for s in container.streams]
            _ = container.duration, container.bit_rate
            return True
    except (av.FFmpegError, OSError, ValueError):
        return False


def _bare_probe(work: tuple[list[bytes], dict[str, str] | None]) -> int:
    paths, options = work
    import_av()
    return sum(probe_one(path, options) for path in paths)


def import_av() -> None:
    """Import PyAV and silence its log: done before the clock starts."""
    import av

    av.logging.set_level(None)


def bare_pyav_rate(
    files: list[bytes], processes: int, options: dict[str, str] | None = None
) -> float:
    """Files per second of a plain PyAV loop split over ``processes`` spawned processes;
    ``options`` go to every ``av.open`` (none: FFmpeg's defaults, as a plain loop has)."""
    chunks = [(files[i::processes], options) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes, initializer=import_av) as pool:
        pool.map(_import_av_task, range(processes))  # every worker up before timing
        started = time.perf_counter()
        pool.map(_bare_probe, chunks)
        elapsed = time.perf_counter() - started
    return len(files) / elapsed


def _import_av_task(_: int) -> None:
    import_av()


def io_floor_rate(root: Path) -> float:
    """Files per second to walk, open and read the first 64 KiB of every video."""
    started = time.perf_counter()
    count = 0
    for path in video_files(root):
        with open(path, "rb") as f:
            f.read(65536)
        count += 1
    return count / (time.perf_counter() - started)


def read_all(files: list[bytes]) -> int:
    """Read every file to the end (so that it is in the page cache); returns the bytes read."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def walk_stat_seconds(root: Path, *, extensions: tuple[bytes, ...] = VIDEO) -> float:
    """Seconds for an os.scandir walk that stats every matching file."""
    started = time.perf_counter()
    stack = [os.fsencode(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(extensions):
                    entry.stat(follow_symlinks=False)
    return time.perf_counter() - started


def walk_seconds(root: Path) -> float:
    """Seconds for a bare os.scandir walk of every entry."""
    started = time.perf_counter()
    for _ in _walk(os.fsencode(root)):
        pass
    return time.perf_counter() - started


async def serve_bare(payload: bytes) -> tuple[grpc.aio.Server, str]:
    """A bare grpc.aio server answering GetJob with a fixed, pre-serialised message."""

    async def get_job(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "scanjobs.v1.ScanService",
        {"GetJob": grpc.unary_unary_rpc_method_handler(get_job)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    target = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(target)
    await server.start()
    return server, target


def unary_rate_in_subprocess(target: str, job_id: str, seconds: float, in_flight: int) -> float:
    """GetJob calls per second from a separate client process with ``in_flight`` calls."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", target, job_id, str(seconds), str(in_flight)],
        capture_output=True, text=True, check=True, env={**os.environ},
    )  # fmt: skip
    return float(json.loads(out.stdout)["calls_per_s"])
