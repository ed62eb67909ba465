"""The server as its users start it: a real process, real flags, real signals."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scanjobs.server.config import parse_args
from tests.conftest import SERVER, ServerProcess


@pytest.fixture
def library(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "media"
    root.mkdir()
    yield root


def test_server_serves_health_and_stops_cleanly_on_sigterm(library: Path, tmp_path: Path) -> None:
    server = ServerProcess("--root", str(library), "--data-dir", str(tmp_path / "d"))
    try:
        assert server.first["message"] == "serving"
        with grpc.insecure_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        code, lines = server.stop()
    assert code == 0
    assert lines[-1]["message"] == "server stopped"
    assert (tmp_path / "d" / "scanjobs.db").exists()


def test_roots_can_come_from_the_environment(library: Path, tmp_path: Path) -> None:
    server = ServerProcess(
        env={"SCANJOBS_ROOT": str(library), "SCANJOBS_DATA_DIR": str(tmp_path / "d")}
    )
    code, _ = server.stop(signal.SIGINT)
    assert server.first["message"] == "serving"
    assert server.first["roots"] == [str(library)]
    assert code == 0


def test_a_corrupt_database_stops_start_up_with_a_clear_error(
    library: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "scanjobs.db").write_bytes(b"garbage" * 1000)
    proc = subprocess.run(
        [*SERVER, "--root", str(library), "--data-dir", str(data), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert "cannot open the database" in proc.stderr


def test_a_port_in_use_is_a_clear_error(library: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run(
            [*SERVER, "--root", str(library), "--data-dir", str(tmp_path), "--listen", address],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 4
    assert f"cannot listen on {address}" in proc.stderr


def test_missing_root_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCANJOBS_ROOT", raising=False)
    with pytest.raises(SystemExit) as caught:
        parse_args(["--data-dir", str(tmp_path)])
    assert caught.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "relative"],
        ["--root", "/x", "--workers", "0"],
        ["--root", "/x", "--job-timeout", "-1"],
        ["--root", "/x", "--extensions", ","],
        ["--root", "/x", "--progress-budget", "0"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2


def test_flags_and_environment_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANJOBS_WORKERS", "5")
    monkeypatch.setenv("SCANJOBS_ROOT", "/a:/b")
    config = parse_args(["--extensions", "MP4,.ts", "--probe-timeout", "2.5"])
    assert config.workers == 5
    assert config.roots == ("/a", "/b")
    assert config.extensions == frozenset({".mp4", ".ts"})
    assert config.probe_timeout_s == 2.5


def test_the_progress_budget_flag_reaches_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANJOBS_PROGRESS_BUDGET", "250")
    assert parse_args(["--root", "/x"]).queue_config().progress_budget_per_s == 250.0
    config = parse_args(["--root", "/x", "--progress-budget", "500.5"])
    assert config.queue_config().progress_budget_per_s == 500.5


def test_a_second_server_cannot_share_the_port_or_the_data_dir(
    library: Path, tmp_path: Path
) -> None:
    first = ServerProcess("--root", str(library), "--data-dir", str(tmp_path / "d"))
    try:
        same_port = subprocess.run(
            [*SERVER, "--root", str(library), "--data-dir", str(tmp_path / "other"),
             "--listen", first.address],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        same_data = subprocess.run(
            [*SERVER, "--root", str(library), "--data-dir", str(tmp_path / "d"),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        code, _ = first.stop()
    assert code == 0
    assert same_port.returncode == 4
    assert f"cannot listen on {first.address}" in same_port.stderr
    assert same_data.returncode == 3
    assert f"is in use by pid {first.proc.pid}" in same_data.stderr


def test_sighup_drains_like_sigterm(library: Path, tmp_path: Path) -> None:
    server = ServerProcess("--root", str(library), "--data-dir", str(tmp_path / "d"))
    code, lines = server.stop(signal.SIGHUP)
    assert code == 0
    assert lines[-1]["message"] == "server stopped"
