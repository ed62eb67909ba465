"""The live library (``--watch``): how soon a copied file's ADDED event comes after its last
write, and what watching a quiet library costs in CPU."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc

from bench.harness import server
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc


async def _reconciled(stub: pb_grpc.ScanServiceStub) -> None:
    async with asyncio.timeout(3600):
        while True:
            roots = (await stub.ListRoots(pb.ListRootsRequest())).roots
            if all(r.HasField("last_reconcile_time") for r in roots):
                return
            await asyncio.sleep(0.1)


async def _latencies(target: str, root: Path, sample: Path, trials: int) -> list[float]:
    """Seconds from each copy's last write to its ADDED event (settle time included)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        await _reconciled(stub)
        after = (await stub.ListVideos(pb.ListVideosRequest(page_size=1))).catalog_sequence
        stream = stub.WatchVideos(pb.WatchVideosRequest(after_sequence=after))
        await stream.wait_for_connection()
        found = []
        for n in range(trials):
            path = root / f"copy{n:04}.mp4"
            shutil.copyfile(sample, path)
            written = time.monotonic()
            async with asyncio.timeout(120):
                while True:
                    event = await stream.read()
                    if event.video.path == str(path):
                        break
            found.append(time.monotonic() - written)
        stream.cancel()
        return found


def added_latencies(root: Path, sample: Path, trials: int, settle_s: float) -> list[float]:
    """Watch an empty ``root``, copy ``sample`` in ``trials`` times, one after the other."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with server(root, "--watch", "--watch-settle", str(settle_s)) as s:
        return asyncio.run(_latencies(s.target, root, sample, trials))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(root: Path, seconds: float) -> float:
    """Percent of one core the server uses while watching ``root`` with nothing changing."""
    with server(root, "--watch") as s:

        async def reconciled() -> None:
            async with grpc.aio.insecure_channel(s.target) as channel:
                await _reconciled(pb_grpc.ScanServiceStub(channel))

        asyncio.run(reconciled())
        before, started = _cpu_seconds(s.proc.pid), time.monotonic()
        time.sleep(seconds)
        used = _cpu_seconds(s.proc.pid) - before
        return 100 * used / (time.monotonic() - started)
