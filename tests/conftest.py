"""Shared fixtures: real media on disk and a real grpc.aio server on an ephemeral port."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from scanjobs.server import fsopen
from scanjobs.server.app import App, start
from scanjobs.server.config import Config
from scanjobs.server.probe import PROBE_COMMAND
from scanjobs.server.scan import DEFAULT_EXTENSIONS
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.media import write_video

pytest_plugins = ["tests.fusefs", "tests.postgres", "tests.queues"]

HERE = Path(__file__).resolve().parent
SERVER = (sys.executable, "-m", "scanjobs.server")
MISBEHAVING_WORKER = (sys.executable, str(HERE / "misbehaving_worker.py"))


@dataclasses.dataclass
class Running:
    """A started server and a client stub connected to it."""

    app: App
    stub: pb_grpc.ScanServiceAsyncStub
    channel: grpc.aio.Channel
    address: str


def make_config(root: Path, data_dir: Path, **overrides: Any) -> Config:
    """A Config for tests: loopback, ephemeral port, small limits."""
    base = Config(
        listen="127.0.0.1:0",
        roots=(str(root),),
        data_dir=data_dir,
        workers=2,
        job_timeout_s=60.0,
        probe_processes=2,
        probe_timeout_s=60.0,  # generous: a busy machine is slow, and no test waits for it
        extensions=DEFAULT_EXTENSIONS,
        max_pending=100,
        shutdown_grace_s=2.0,
        lame_duck_s=0.0,  # in-process: nothing sends calls after the drain began
        log_level="INFO",
    )
    return dataclasses.replace(base, **overrides)


ServeFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """Start servers on demand: ``await serve(root, misbehaving=True, workers=1)``; overrides
    are Config fields (``data_dir`` and ``roots`` too)."""
    running: list[Running] = []

    async def _serve(root: Path, **overrides: Any) -> Running:
        data_dir = overrides.pop("data_dir", tmp_path / f"data{len(running)}")
        r = await start_running(root, data_dir, **overrides)
        running.append(r)
        return r

    yield _serve
    for r in running:
        await stop_running(r)


async def start_running(
    root: Path,
    data_dir: Path,
    *,
    misbehaving: bool = False,
    clock_ns: Callable[[], int] = time.time_ns,
    **overrides: Any,
) -> Running:
    """Start a server in this process and connect a client to it (``serve`` does both, and
    stops it after the test; a fixture of a wider scope calls this and ``stop_running``)."""
    config = make_config(root, data_dir, **overrides)
    command = MISBEHAVING_WORKER if misbehaving else PROBE_COMMAND
    app = await start(config, probe_command=command, clock_ns=clock_ns)
    address = f"127.0.0.1:{app.port}"
    channel = grpc.aio.insecure_channel(address)
    return Running(app, pb_grpc.ScanServiceStub(channel), channel, address)


async def stop_running(r: Running) -> None:
    await r.channel.close()
    await r.app.stop()


@pytest.fixture(params=["openat2", "by components"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with openat2, then with the per-component fallback used without it."""
    if request.param == "openat2":
        if not fsopen.has_openat2():
            pytest.skip("this kernel refuses openat2")
    else:
        monkeypatch.setattr(fsopen, "has_openat2", lambda: False)
        monkeypatch.setenv(fsopen.BY_COMPONENTS_VARIABLE, "1")  # the server's workers too
    return str(request.param)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A small library: four real videos, two broken ones, one non-video, a subfolder."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4")
    write_video(root / "b.mkv", container="matroska", subtitles=True)
    write_video(root / "sub" / "c.webm", codec="libvpx-vp9", audio="libopus")
    write_video(root / "sub" / "d.mov", audio=None)
    (root / "garbage.mp4").write_bytes(b"not a video at all" * 50)
    (root / "notes.txt").write_text("not a video")
    return root


def gated_library(root: Path) -> Path:
    """A folder whose one file blocks in the misbehaving probe worker until ``open-gate``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "gate.mp4").write_bytes(b"x")
    return root


def error_reason(error: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call's rich status ("" if it has none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait until ``condition()`` holds, checking it between turns of the event loop.

    For what no event announces (a thread ended, a file appeared, a process got a request);
    the timeout is only a generous bound, never part of what a test asserts.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened within {timeout_s:g} s: {what}") from None


def probing(path: Path) -> bool:
    """True once the misbehaving worker took ``path`` (a ``gate`` or ``hang`` file)."""
    return path.with_name(path.name + ".probing").exists()


async def until_running(stub: pb_grpc.ScanServiceAsyncStub, job_id: str) -> pb.Job:
    """The job once a worker started it."""
    async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        if event.job.state != pb.JOB_STATE_PENDING:
            return event.job
    raise AssertionError(f"job {job_id} ended before it was seen running")


async def watch_all(
    stub: pb_grpc.ScanServiceAsyncStub, job_id: str, after: int = 0
) -> list[pb.JobEvent]:
    """Every event of a WatchJob stream until it ends."""
    return [e async for e in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=after))]


async def joined(
    stub: pb_grpc.ScanServiceAsyncStub, job_id: str
) -> asyncio.Task[list[pb.JobEvent]]:
    """A watcher that is in: its first event has arrived. The task gives every event until
    the stream ends."""
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
    first = await stream.read()
    assert first is not grpc.aio.EOF

    async def rest() -> list[pb.JobEvent]:
        events = [first]
        while (event := await stream.read()) is not grpc.aio.EOF:
            events.append(event)
        return events

    return asyncio.create_task(rest())


async def wait_terminal(stub: pb_grpc.ScanServiceAsyncStub, job_id: str) -> pb.Job:
    """The job once it reached a terminal state."""
    events = await watch_all(stub, job_id)
    return events[-1].job


_PROCESSES: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_stray_servers() -> Iterator[None]:
    """Kill any server process a test started and left running (e.g. after a failure)."""
    yield
    while _PROCESSES:
        proc = _PROCESSES.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class ServerProcess:
    """``python -m scanjobs.server`` on an ephemeral port; log lines are collected as they come.

    Without ``--lame-duck`` in ``args`` it runs with none: a stop then takes no 2 s pause that
    only a test of the drain looks at (those pass the flag).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        lame_duck = () if "--lame-duck" in args else ("--lame-duck", "0")
        self.proc = subprocess.Popen(
            [*SERVER, "--listen", "127.0.0.1:0", *lame_duck, *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        _PROCESSES.append(self.proc)
        self.lines: list[dict[str, object]] = []
        self._first = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._first.wait(timeout=30)
        serving = [x for x in self.lines if x.get("message") == "serving"]
        self.first = (serving or self.lines or [{"message": ""}])[0]
        self.address = f"127.0.0.1:{self.first.get('port', 0)}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                if line.startswith("{"):
                    self.lines.append(json.loads(line))
                    if self.lines[-1].get("message") in {"serving", "cannot open the database"}:
                        self._first.set()
        self._first.set()

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, list[dict[str, object]]]:
        """Send ``signum``, wait for the exit; returns the exit code and every log line."""
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self) -> tuple[int, list[dict[str, object]]]:
        """Wait for the process to exit; returns the exit code and every log line."""
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return code, self.lines
