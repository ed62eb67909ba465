"""The ``scanjobs`` command as people and scripts run it: a real process against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from scanjobs.server.jobs import JobState
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory, eventually, gated_library

CLI = (sys.executable, "-m", "scanjobs.client")


@dataclass
class Result:
    code: int
    out: str
    err: str


async def run_cli(s: Running, *args: str, cwd: Path | None = None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "--target",
        s.address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def _until_running(s: Running) -> pb.Job:
    await eventually(lambda: JobState.RUNNING in s.app.queue.stats()[0], "a job started")
    jobs = await s.stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_RUNNING))
    return jobs.jobs[0]


async def test_scan_prints_the_result_and_exits_0(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    r = await run_cli(s, "scan", str(media))
    assert r.code == 0, r.err
    assert "COMPLETED in" in r.out
    assert (
        "5 scanned, 4 added, 0 updated, 0 unchanged, 0 moved, 0 restored, 1 failed, 0 removed"
        in r.out
    )
    assert f"{media / 'garbage.mp4'}: not a readable video" in r.out
    assert r.err == ""


async def test_scan_resolves_a_relative_path(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    r = await run_cli(s, "--json", "scan", ".", "--detach", cwd=media / "sub")
    assert r.code == 0, r.err
    assert json.loads(r.out)["path"] == str(media / "sub")


async def test_scan_json_streams_events_as_json_lines(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    r = await run_cli(s, "--json", "scan", str(media), "--no-recursive")
    events = [json.loads(line) for line in r.out.splitlines()]
    assert r.code == 0
    assert events[-1]["job"]["state"] == "JOB_STATE_COMPLETED"
    assert events[-1]["job"]["recursive"] is False
    assert [int(e["sequence"]) for e in events] == sorted({int(e["sequence"]) for e in events})


async def test_get_watch_jobs_and_videos(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    job_id = json.loads((await run_cli(s, "--json", "scan", str(media), "--detach")).out)["id"]

    watched = await run_cli(s, "watch", job_id)
    got = await run_cli(s, "get", job_id)
    got_json = json.loads((await run_cli(s, "--json", "get", job_id)).out)
    jobs = await run_cli(s, "jobs", "--state", "completed")
    videos = await run_cli(s, "videos", "--prefix", str(media / "sub"))
    videos_json = json.loads((await run_cli(s, "--json", "videos", "--job", job_id)).out)

    assert watched.code == 0 and "COMPLETED" in watched.out
    assert "state  COMPLETED" in got.out and job_id in got.out
    assert got_json["result"]["added"] == "4"
    assert jobs.out.splitlines()[0].split("\t") == [
        "id",
        "state",
        "path",
        "done",
        "created",
        "trigger",
    ]
    assert jobs.out.splitlines()[1].split("\t")[:3] == [job_id, "COMPLETED", str(media)]
    rows = [line.split("\t") for line in videos.out.splitlines()]
    assert rows[0] == ["path", "duration", "resolution", "fps", "codecs"]
    assert rows[1] == [str(media / "sub" / "c.webm"), "0:00.41", "64x48", "25", "vp9/opus"]
    assert rows[2][0] == str(media / "sub" / "d.mov") and rows[2][4] == "h264"
    assert len(videos_json) == 4


async def test_rescan_summary_missing_videos_and_file_errors(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    await run_cli(s, "scan", str(media))
    (media / "a.mp4").rename(media / "sub" / "a-moved.mp4")
    (media / "b.mkv").unlink()
    rescan = await run_cli(s, "scan", str(media))
    missing = await run_cli(s, "videos", "--missing")
    errors = await run_cli(s, "errors", str(media))
    none = await run_cli(s, "errors", str(media / "sub"))
    reprobe = await run_cli(s, "scan", "--reprobe", str(media))

    assert rescan.code == 0
    assert "4 scanned, 0 added, 0 updated, 2 unchanged, 1 moved, 0 restored, 1 failed, " in (
        rescan.out
    )
    assert "1 removed" in rescan.out
    rows = [line.split("\t") for line in missing.out.splitlines()]
    assert rows[0] == ["path", "missing since", "codecs"]
    assert [r[0] for r in rows[1:]] == [str(media / "b.mkv")]
    rows = [line.split("\t") for line in errors.out.splitlines()]
    assert rows[0] == ["path", "error", "size"]
    assert rows[1][0] == str(media / "garbage.mp4") and rows[1][1].startswith("not a readable")
    assert none.out.splitlines() == ["path\terror\tsize"]
    assert "4 scanned, 0 added, 3 updated, 0 unchanged, 0 moved" in reprobe.out


async def test_cancel_command_and_its_errors(serve: ServeFactory, tmp_path: Path) -> None:
    root = gated_library(tmp_path / "lib")
    s = await serve(root, misbehaving=True)
    job_id = json.loads((await run_cli(s, "--json", "scan", str(root), "--detach")).out)["id"]
    await _until_running(s)

    cancelled = await run_cli(s, "cancel", job_id)
    watched = await run_cli(s, "watch", job_id)
    again = await run_cli(s, "cancel", job_id)
    unknown = await run_cli(s, "cancel", "0" * 32)

    assert cancelled.code == 0 and "cancel requested" in cancelled.out
    assert watched.code == 5 and "CANCELLED" in watched.out
    assert again.code == 0
    assert unknown.code == 1
    assert unknown.err.strip() == f"error: not found: job {'0' * 32} not found"


async def test_errors_are_one_clear_line_never_a_traceback(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    outside = await run_cli(s, "scan", "/etc")
    missing = await run_cli(s, "scan", str(media / "nope"))
    assert outside.code == 1
    assert outside.err.strip() == "error: permission denied: /etc is outside the allowed roots"
    assert missing.code == 1
    assert missing.err.strip() == f"error: not found: {media / 'nope'} does not exist"
    for r in (outside, missing):
        assert "Traceback" not in r.err + r.out


async def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--target", "127.0.0.1:9", "--deadline", "1", "jobs",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().startswith("error: unavailable:")
    assert "Traceback" not in err.decode()


async def test_job_timeout_exits_4(serve: ServeFactory, tmp_path: Path) -> None:
    root = gated_library(tmp_path / "lib")
    s = await serve(root, misbehaving=True)
    r = await run_cli(s, "scan", str(root), "--timeout", "0.2")
    assert r.code == 4
    assert "TIMEOUT" in r.out and "timeout" in r.out


async def test_ctrl_c_cancels_the_job_and_exits_with_the_cancelled_code(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = gated_library(tmp_path / "lib")
    s = await serve(root, misbehaving=True)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--target", s.address, "scan", str(root),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    job = await _until_running(s)
    await eventually(lambda: s.app.queue.watcher_count(job.id) > 0, "the CLI watches the job")

    proc.send_signal(signal.SIGINT)
    out, err = await proc.communicate()

    assert proc.returncode == 5, err.decode()
    assert "cancelling" in out.decode()
    assert "CANCELLED" in out.decode()
    final = await s.stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.state == pb.JOB_STATE_CANCELLED


async def test_progress_bar_is_drawn_on_a_terminal(serve: ServeFactory, tmp_path: Path) -> None:
    root = gated_library(tmp_path / "lib")
    for n in range(400):  # several catalog batches: progress moves while the gate holds one
        (root / f"junk{n}.mp4").write_bytes(b"not video")
    s = await serve(root, misbehaving=True)
    controller, terminal = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "20", "TERM": "xterm"}
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--target", s.address, "scan", str(root),
        stdin=terminal, stdout=terminal, stderr=terminal, env=env,
    )  # fmt: skip
    os.close(terminal)
    screen = b""
    loop = asyncio.get_running_loop()
    # The bar while the gate holds a batch: probing, every file found. (Rich shows a rate
    # only from a second progress update on, and none comes before the gate opens.)
    for _ in range(200):
        screen += await loop.run_in_executor(None, os.read, controller, 65536)
        if b"probing" in screen and b"/401" in screen:
            break
    (root / "open-gate").touch()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    await proc.wait()

    text = screen.decode(errors="replace")
    assert "\u2501" in text  # the bar
    assert "probing" in text
    assert "/401" in text  # done / found
    assert "COMPLETED in" in text
    assert proc.returncode == 0
