"""A library on a network share: the real server scanning through a FUSE mount that adds a delay
to every filesystem operation, with the kernel's attribute and name caches off
(``tests/fusefs.py``), each against a bare loop on the same mount in the same run.

Fairness. Debian's libfuse 3.14 makes the kernel look up new names one at a time per folder;
names it has learnt from a listing are looked up in parallel. So the side that meets a name
first would pay for it. Every measured run here therefore starts on a freshly mounted share
whose every folder has just been listed (untimed), so that both sides start with the same names
known and nothing else cached: the server's first scan and its rescan, then the walk + stat
baseline, on one mount; the bare PyAV loop on another. The files behind the mount are read once
beforehand, so that the local disk under the share is equally warm for both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import baselines
from bench.harness import server, timed_scan
from scanjobs.v1 import scanjobs_pb2 as pb

IN_FLIGHT = 16  # files (or stats) in flight in both baselines
DELAY_S = 0.005  # added to every filesystem operation on the share


@dataclass
class NasFigures:
    """Files per second on the share, the best of the rounds for each."""

    files: int
    first_scan: float
    bare_pyav: float
    rescan: float
    walk_stat: float


def unavailable() -> str | None:
    """Why the share cannot be mounted here, or None when it can."""
    from tests.fusefs import fuse_unavailable

    return fuse_unavailable()


@contextlib.contextmanager
def fresh_share(source: Path, delay_s: float = DELAY_S) -> Iterator[tuple[Path, list[bytes]]]:
    """A new mount of ``source``, every folder listed once: its path and its video files."""
    from tests.fusefs import mounted

    with (
        tempfile.TemporaryDirectory(prefix="scanjobs-nas-") as where,
        mounted(source, Path(where) / "share", delay_s=delay_s) as share,
    ):
        yield share.path, baselines.video_files(share.path)


def pyav_threads_rate(files: list[bytes], in_flight: int = IN_FLIGHT) -> float:
    """Files per second of a bare PyAV loop (open, read the streams) with ``in_flight`` files
    at once on threads: PyAV releases the GIL while it reads."""
    baselines.import_av()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda _: None, range(in_flight)))  # every thread up before timing
        started = time.perf_counter()
        list(pool.map(baselines.probe_one, files))
        elapsed = time.perf_counter() - started
    return len(files) / elapsed


def walk_stat_threads_rate(root: Path, in_flight: int = IN_FLIGHT) -> float:
    """Video files per second of an ``os.scandir`` walk whose folders' videos are stated with
    ``in_flight`` stats at once on threads, while the walk goes on."""
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda _: None, range(in_flight)))
        started = time.perf_counter()
        stats = []
        stack = [os.fsencode(root)]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.name.lower().endswith(baselines.VIDEO):
                        stats.append(pool.submit(os.stat, entry.path, follow_symlinks=False))
        for stat in stats:
            stat.result()
        elapsed = time.perf_counter() - started
    return len(stats) / elapsed


def _timed_scan(target: str, root: Path) -> tuple[float, pb.Job]:
    """Seconds from the SubmitScan call to the terminal event, and the final job."""
    return timed_scan(target, root)


def _server_round(source: Path, processes: int) -> tuple[int, float, float, float]:
    """On one fresh share: the server's first scan and rescan, then the walk + stat baseline.
    Returns the files and the three rates."""
    with fresh_share(source) as (path, files):
        # No lame duck on the way out: nobody calls it then, and the quick run stays quick.
        with server(path, "--probe-processes", str(processes), "--lame-duck", "0") as s:
            cold_s, cold = _timed_scan(s.target, path)
            warm_s, warm = _timed_scan(s.target, path)
        assert cold.result.scanned == len(files), cold.result
        assert warm.result.unchanged + warm.result.failed == len(files), warm.result
        stat_rate = walk_stat_threads_rate(path)
    return len(files), len(files) / cold_s, len(files) / warm_s, stat_rate


def nas(source: Path, processes: int, rounds: int) -> NasFigures:
    """``rounds`` rounds, each a server round and a bare PyAV round on fresh shares of
    ``source``; the best figure of each over the rounds (a neighbour's burst of work on the
    machine then weighs on neither side alone)."""
    baselines.read_all(baselines.video_files(source))
    figures = NasFigures(0, 0.0, 0.0, 0.0, 0.0)
    for _ in range(rounds):
        files, first, again, stat = _server_round(source, processes)
        with fresh_share(source) as (_, paths):
            bare = pyav_threads_rate(paths)
        figures = NasFigures(
            files,
            max(figures.first_scan, first),
            max(figures.bare_pyav, bare),
            max(figures.rescan, again),
            max(figures.walk_stat, stat),
        )
    return figures
