"""Running a real server for a benchmark, scanning with it, and reading its memory use."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanjobs.client import ScanClient
from scanjobs.v1 import scanjobs_pb2 as pb


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MiB (``VmHWM`` for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and every process below it."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending += children(current)
    return total


def wait_settled(pid: int, timeout_s: float = 15.0) -> None:
    """Block until ``pid``'s processes are idle (under 20 ms of CPU in 0.2 s): a server whose
    workers are up, as a long-running one is when a job comes (the bare loops are timed
    after their processes are up, too)."""
    deadline = time.monotonic() + timeout_s
    used = _tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _tree_cpu_s(pid)
        if now - used < 0.02:
            return
        used = now


@dataclass
class Server:
    """A server process serving ``target``."""

    proc: subprocess.Popen[bytes]
    target: str
    data_dir: Path


def wait_serving(target: str, timeout_s: float = 30.0) -> None:
    """Block until the health service at ``target`` says SERVING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    raise RuntimeError(f"no server at {target}")


@contextmanager
def server(root: Path, *extra: str) -> Iterator[Server]:
    """``python -m scanjobs.server`` on a free port and a fresh data directory, stopped after
    (at once: no lame duck, since nothing calls it once a benchmark is done with it)."""
    with tempfile.TemporaryDirectory(prefix="scanjobs-bench-") as data:
        target = f"127.0.0.1:{free_port()}"
        log = (Path(data) / "server.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "scanjobs.server", "--root", str(root), "--data-dir", data,
             "--listen", target, "--log-level", "WARNING", "--lame-duck", "0", *extra],
            stderr=log,
        )  # fmt: skip
        try:
            wait_serving(target)
            wait_settled(proc.pid)
            yield Server(proc, target, Path(data))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


async def scan_once(target: str, path: Path) -> pb.Job:
    """Submit a scan and wait for its end; returns the final job."""
    return (await _timed_scan(target, path))[1]


def timed_scan(target: str, path: Path) -> tuple[float, pb.Job]:
    """Seconds from the SubmitScan call to the terminal event on WatchJob, and the final job.

    The client's connection is made first (a ListJobs call), as a client that keeps its
    channel has it: the time is the scan's, not a TCP and HTTP/2 handshake's.
    """
    return asyncio.run(_timed_scan(target, path))


async def _timed_scan(target: str, path: Path) -> tuple[float, pb.Job]:
    async with ScanClient(target, timeout_s=60) as client:
        async for _ in client.list_jobs(limit=1):
            break
        started = time.perf_counter()
        job = await client.submit(str(path))
        final = job
        async for event in client.watch(job.id):
            final = event.job
        return time.perf_counter() - started, final


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
