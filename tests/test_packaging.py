"""The built wheel as a user installs it: one `scanjobs` namespace, both commands working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.media import write_video

ROOT = Path(__file__).resolve().parent.parent


def _uv() -> str:
    local = ROOT / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is needed to build the wheel: run `make setup`")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [_uv(), "build", "--wheel", "--out-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("scanjobs-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("venv") / "env"
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    subprocess.run(
        [_uv(), "venv", "--quiet", "--python", sys.executable, str(where)],
        check=True,
        env=env,
        timeout=120,
    )
    subprocess.run(
        [_uv(), "pip", "install", "--quiet", "--python", str(where / "bin" / "python"), str(wheel)],
        check=True,
        env=env,
        timeout=600,
    )
    return where


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"scanjobs"}
    for module in (
        "scanjobs/server/__main__.py",
        "scanjobs/server/static/index.html",
        "scanjobs/client/cli.py",
        "scanjobs/v1/scanjobs_pb2.py",
        "scanjobs/v1/scanjobs_pb2.pyi",
        "scanjobs/v1/scanjobs_connect.py",
        "scanjobs/py.typed",
    ):
        assert module in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_installed_library_has_no_server_or_client_top_level_module(
    venv: Path, tmp_path: Path
) -> None:
    code = (
        "import importlib.util, scanjobs.client, scanjobs.server, scanjobs.v1.scanjobs_pb2;"
        "print(importlib.util.find_spec('server'), importlib.util.find_spec('client'));"
        "print(scanjobs.client.ScanClient.__module__)"
    )
    out = _run(venv, str(venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "scanjobs.client.api"]


def test_both_commands_run_a_scan_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "clip.mp4")
    data = tmp_path / "data"
    server = subprocess.Popen(
        [
            str(venv / "bin" / "scanjobs-server"),
            "--listen",
            "127.0.0.1:0",
            "--root",
            str(media),
            "--data-dir",
            str(data),
            "--probe-processes",
            "1",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        port = None
        for line in server.stderr:
            if line.startswith("{") and json.loads(line).get("message") == "serving":
                port = json.loads(line)["port"]
                break
        assert port, "the installed scanjobs-server never served"
        scan = _run(
            venv,
            str(venv / "bin" / "scanjobs"),
            "--target",
            f"127.0.0.1:{port}",
            "--json",
            "scan",
            str(media),
            cwd=tmp_path,
        )
        assert scan.returncode == 0, scan.stderr
        videos = _run(
            venv,
            str(venv / "bin" / "scanjobs"),
            "--target",
            f"127.0.0.1:{port}",
            "videos",
            cwd=tmp_path,
        )
        assert str(media / "clip.mp4") in videos.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
