"""``scanjobs follow``, ``scanjobs roots`` and the trigger in ``scanjobs jobs``: real
processes against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from bench.harness import free_port
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import ServeFactory
from tests.media import write_video
from tests.test_cli import CLI, run_cli
from tests.test_reconcile import scan


@contextlib.contextmanager
def _sigint_at_its_default() -> Iterator[None]:
    """Processes started inside get SIGINT at its default, as from a terminal (Ctrl-C), also
    when this test run was itself started with SIGINT ignored (as a script's background job
    is, and everything it starts): Python, and so ``scanjobs follow``, keep an inherited
    "ignore"."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def test_follow_prints_changes_and_resumes_across_a_server_restart(
    serve: ServeFactory, tmp_path: Path
) -> None:
    lib, data = tmp_path / "lib", tmp_path / "data"
    lib.mkdir()
    sample = write_video(tmp_path / "sample.mp4")
    shutil.copyfile(sample, lib / "a.mp4")
    listen = f"127.0.0.1:{free_port()}"
    first = await serve(lib, listen=listen, data_dir=data)
    await scan(first, lib)
    after = (await first.stub.ListVideos(pb.ListVideosRequest())).catalog_sequence
    errors = tmp_path / "follow.err"
    with _sigint_at_its_default(), errors.open("wb") as stderr:
        follow = await asyncio.create_subprocess_exec(
            *CLI, "--target", listen, "follow", str(lib), "--after", str(after),
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    assert follow.stdout is not None
    try:
        shutil.copyfile(sample, lib / "b.mp4")
        await scan(first, lib)
        async with asyncio.timeout(60):
            line = (await follow.stdout.readline()).decode()
        assert line == f"{after + 1}\tadded\t{lib / 'b.mp4'}\n"

        await first.app.stop()
        second = await serve(lib, listen=listen, data_dir=data)
        (lib / "b.mp4").rename(lib / "c.mp4")
        await scan(second, lib)
        async with asyncio.timeout(60):
            line = (await follow.stdout.readline()).decode()
        assert line == f"{after + 2}\tmoved\t{lib / 'c.mp4'}\t(was {lib / 'b.mp4'})\n"
    finally:
        follow.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(follow.wait(), 30)
        finally:
            if follow.returncode is None:
                follow.kill()
                await follow.wait()
    assert follow.returncode == 130, errors.read_text()


async def test_roots_shows_how_each_root_is_watched(serve: ServeFactory, tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4")
    s = await serve(tmp_path)
    await scan(s, tmp_path)
    r = await run_cli(s, "roots")
    assert r.code == 0, r.err
    header, row = r.out.splitlines()
    assert header.split("\t") == ["root", "watch", "videos", "last reconcile", "reason"]
    assert row.split("\t") == [str(tmp_path), "off", "1", "-", "the server runs without --watch"]
    jobs = await run_cli(s, "jobs")
    header, row = (line.split("\t") for line in jobs.out.splitlines()[:2])
    assert header == ["id", "state", "path", "done", "created", "trigger"]
    assert (row[1], row[2], row[5]) == ("COMPLETED", str(tmp_path), "api")


async def test_roots_of_a_watching_server(serve: ServeFactory, tmp_path: Path) -> None:
    s = await serve(tmp_path, watch=True, watch_settle_s=0.5)
    async with asyncio.timeout(60):
        while (
            not (await s.stub.ListRoots(pb.ListRootsRequest()))
            .roots[0]
            .HasField("last_reconcile_time")
        ):
            await asyncio.sleep(0.05)
    r = await run_cli(s, "--json", "roots")
    assert r.code == 0, r.err
    assert '"watch_mode": "WATCH_MODE_EVENTS"' in r.out
    jobs = await run_cli(s, "jobs")
    assert jobs.out.splitlines()[1].split("\t")[5] == "schedule"
