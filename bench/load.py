"""Load generators that run as their own processes, so they do not share the server's loop.

``python -m bench.load TARGET JOB_ID SECONDS IN_FLIGHT``: GetJob calls per second.
``python -m bench.load --watch TARGET JOB_ID WATCHERS``: WatchJob fan-out delays.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc


async def unary(target: str, job_id: str, seconds: float, in_flight: int) -> dict[str, float]:
    """Keep ``in_flight`` GetJob calls going for ``seconds``; count the answers."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScanServiceStub(channel)
        request = pb.GetJobRequest(job_id=job_id)
        await stub.GetJob(request)
        deadline = time.perf_counter() + seconds
        counts = [0] * in_flight

        async def loop(n: int) -> None:
            while time.perf_counter() < deadline:
                await stub.GetJob(request)
                counts[n] += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(n) for n in range(in_flight)))
        return {"calls_per_s": sum(counts) / (time.perf_counter() - started)}


async def fan_out(target: str, job_id: str, watchers: int) -> dict[str, object]:
    """``watchers`` streams on one job; the delay of every event, creation to arrival.

    State changes (the job's state differs from the stream's previous event) are never held
    back, so their delay is the time to deliver them: ``delays``. Progress goes to each
    stream at its turn under the server's ``--progress-budget``, so its age on arrival
    (``progress_ages``) includes that wait by design.
    """
    # A connection each (no shared subchannel), as many clients would have: the server admits
    # a bounded number of streams per connection.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, watchers // 100))
    ]
    delays: list[float] = []
    ages: list[float] = []
    ready = asyncio.Event()
    connected = 0

    async def follow(n: int) -> None:
        nonlocal connected
        stub = pb_grpc.ScanServiceStub(channels[n % len(channels)])
        state = None
        async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            arrived = time.time()
            if state is None:
                state = event.job.state
                connected += 1
                if connected == watchers:
                    ready.set()
                continue  # the snapshot may be old by design; measure live events only
            delay = arrived - event.event_time.ToNanoseconds() / 1e9
            (ages if event.job.state == state else delays).append(delay)
            state = event.job.state

    tasks = [asyncio.create_task(follow(n)) for n in range(watchers)]
    await asyncio.wait_for(ready.wait(), 120)
    print(json.dumps({"connected": watchers}), flush=True)
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {"delays": delays, "progress_ages": ages}


def main() -> None:
    if sys.argv[1] == "--watch":
        target, job_id, watchers = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps(asyncio.run(fan_out(target, job_id, watchers))))
        return
    target, job_id, seconds, in_flight = (
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    print(json.dumps(asyncio.run(unary(target, job_id, seconds, in_flight))))


if __name__ == "__main__":
    main()
