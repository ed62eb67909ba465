"""The benchmarks at tiny sizes, so that they keep working; no figure is checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fusefs import fuse_unavailable


@pytest.mark.timeout(600)  # a benchmark run: minutes on a busy machine
def test_every_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip-ffprobe", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"].split(",")[0] for r in rows}
    assert {
        "scan throughput",
        "rescan (all unchanged)",
        "cancel latency p99",
        "fan-out delay p99",
        "GetJob calls/s",
        "peak server RSS during that scan",
    } <= names
    assert any(n.startswith("rescan of ") for n in names)
    assert "scan throughput, realistic files" in {r["name"] for r in rows}
    if fuse_unavailable() is None:
        assert {"first scan on a 5 ms share", "rescan on a 5 ms share"} <= names
    bad = [r for r in rows if not (r["ours"] >= 0 and r["baseline"] > 0)]
    assert not bad, bad
    assert "benchmark" in proc.stdout and "ratio" in proc.stdout
