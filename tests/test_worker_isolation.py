"""Probe workers parse files an attacker may have crafted: what an exploited one can do.

Its replies are decoded as data with a size limit (never unpickled), it starts with a clean
environment and an address-space limit, and it can run as another user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scanjobs.server.config import parse_args
from scanjobs.server.probe import ProbePool
from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import ServeFactory, eventually, wait_terminal
from tests.media import write_video

SECRET_URL = "postgresql://scanjobs:hunter2@db.internal/scanjobs"


def _library(root: Path, *names: str) -> Path:
    root.mkdir(parents=True)
    write_video(root / "good.mp4")
    for name in names:
        (root / name).write_bytes(b"x")
    return root


async def _errors(s: object, root: Path) -> tuple[pb.Job, dict[str, str]]:
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))  # type: ignore[attr-defined]
    final = await wait_terminal(s.stub, job.id)  # type: ignore[attr-defined]
    return final, {Path(e.path).name: e.message for e in final.result.errors}


async def test_an_oversized_worker_reply_fails_that_file_and_the_job_goes_on(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", "oversized.mp4")
    s = await serve(root, misbehaving=True, probe_processes=1)
    final, errors = await _errors(s, root)
    assert errors == {"oversized.mp4": "the probe worker sent an oversized reply (10485760 bytes)"}
    assert (final.state, final.result.added) == (pb.JOB_STATE_COMPLETED, 1)


async def test_a_worker_reply_in_a_foreign_format_is_never_unpickled(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = _library(tmp_path / "lib", "pickle.mp4")
    s = await serve(root, misbehaving=True, probe_processes=1)
    final, errors = await _errors(s, root)
    assert errors == {"pickle.mp4": "the probe worker sent a reply that is not in our format"}
    assert not (root / "unpickled").exists(), "the server ran code a worker sent"
    assert (final.state, final.result.added) == (pb.JOB_STATE_COMPLETED, 1)


async def test_workers_get_a_clean_environment_and_an_address_space_limit(
    serve: ServeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCANJOBS_DATABASE", SECRET_URL)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    root = _library(tmp_path / "lib", "report.mp4", "allocate.mp4")
    s = await serve(root, misbehaving=True, probe_memory_mib=512)
    _, errors = await _errors(s, root)
    report = json.loads(errors["report.mp4"])
    assert not {"SCANJOBS_DATABASE", "AWS_SECRET_ACCESS_KEY"} & set(report["env"])
    # glibc keeps FFmpeg's buffers between files (not ~110 page faults a file).
    assert {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} <= set(
        report["env"]
    )
    assert report["address_space"] == 512 * 2**20
    assert errors["allocate.mp4"] == "allocation refused"


def _children(command_part: str, parent: int | None = None) -> list[int]:
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and command_part.encode() in cmdline:
            found.append(int(entry))
    return found


def _loaded_ffmpeg(pid: int) -> bool:
    return b"libavformat" in Path(f"/proc/{pid}/maps").read_bytes()


async def test_the_real_workers_of_a_server_hold_no_secret_and_are_limited(
    serve: ServeFactory, media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCANJOBS_DATABASE", SECRET_URL)
    s = await serve(media, probe_processes=2)
    await _errors(s, media)  # the workers have probed files
    # The scan workers hold the catalog's connection but never load FFmpeg; their probe
    # processes parse the files, with no secret and a memory limit.
    scan_workers = _children("scanjobs.server.scanworker")
    assert len(scan_workers) == 2
    assert not any(_loaded_ffmpeg(pid) for pid in scan_workers)
    workers = [p for w in scan_workers for p in _children("scanjobs.server.probe", w)]
    assert len(workers) == 2
    # A worker that has not probed yet may still be starting on a busy machine: wait until
    # each has loaded FFmpeg, which it does after setting its limit.
    await eventually(lambda: all(_loaded_ffmpeg(pid) for pid in workers), "workers started")
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"SCANJOBS_DATABASE" not in environ and b"hunter2" not in environ
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
        assert line.split()[3:5] == [str(2**30), str(2**30)]  # the 1 GiB default, soft and hard


async def test_workers_run_as_the_probe_user_without_supplementary_groups() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start workers as another user")
    pool = ProbePool(1, command=("/bin/sleep", "600"), user="nobody")
    await pool.start()
    try:
        (pid,) = _children("/bin/sleep\x00600")
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    finally:
        await pool.close()
    assert status["Uid"].split()[:2] == ["65534", "65534"]
    assert status["Gid"].split()[0] != "0"
    assert status["Groups"].strip() == ""


def test_an_unknown_probe_user_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--root", "/srv", "--probe-user", "no-such-user-here"])
    assert "--probe-user: no such user: no-such-user-here" in capsys.readouterr().err


def test_probe_memory_reads_its_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args(["--root", "/srv"]).probe_memory_mib == 1024
    assert parse_args(["--root", "/srv", "--probe-memory", "256"]).probe_memory_mib == 256
    monkeypatch.setenv("SCANJOBS_PROBE_MEMORY", "0")
    assert parse_args(["--root", "/srv"]).probe_memory_mib == 0
    with pytest.raises(SystemExit):
        parse_args(["--root", "/srv", "--probe-memory", "64"])
