"""The benchmarks at tiny sizes, so that they keep working; no figure is checked here.

Each benchmark runs on its own (``python -m bench --quick --only NAME``), so that a failure
names it. The classes are units of work for ``--dist loadscope``: xdist hands them to
different workers, where one run of every benchmark held one worker for minutes. The quick
corpora are built first, once, under a lock: two benchmarks building the same corpus at once
would delete each other's files.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import pytest

from bench.__main__ import _BENCHMARKS, CACHE, QUICK, Corpora
from tests import postgres
from tests.fusefs import fuse_unavailable

# The rows each benchmark must report, by the start of their names; none where what it
# needs is missing (its run says so and reports nothing).
EXPECTED: dict[str, tuple[str, ...]] = {
    "scan": ("scan throughput", "rescan (all unchanged)"),
    "realistic": ("scan throughput, realistic files",),
    "rescan": ("rescan of ",),
    "cancel": ("cancel latency p99, between small files", "cancel latency p99, large-file"),
    "fanout": (
        "fan-out delay p99",
        "fan-out progress age p99",
        "fan-out extra RSS",
        "job time with",
    ),
    "rpc": ("GetJob calls/s",),
    "scale": ("walk-only scan", "peak server RSS during that scan", "peak scan worker RSS"),
    "replicas": ("jobs/s", "cancel p99, cancel and watch") if postgres.available() else (),
    "live": ("last write -> ADDED", "idle CPU watching"),
    "nas": ("first scan on a 5 ms share", "rescan on a 5 ms share")
    if fuse_unavailable() is None
    else (),
}


@pytest.fixture(scope="session")
def quick_corpora() -> Iterator[None]:
    """Every corpus of the quick sizes, built (or found in the cache) under a lock that the
    other xdist workers wait on."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".quick.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        corpora = Corpora(QUICK, "quick")
        for name, member in vars(Corpora).items():
            if isinstance(member, cached_property):
                getattr(corpora, name)
    yield


def run_benchmark(name: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip-ffprobe", "--only", name,
         "--output", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    for start in EXPECTED[name]:
        assert any(n.startswith(start) for n in names), (start, names)
    bad = [r for r in rows if not (r["ours"] >= 0 and r["baseline"] > 0)]
    assert not bad, bad
    assert "benchmark" in proc.stdout and "ratio" in proc.stdout  # the table is printed


def test_every_benchmark_has_a_smoke_run() -> None:
    groups = [TestThroughput, TestLatency, TestScale, TestLiveLibrary]
    covered = [p for g in groups for p in g.BENCHMARKS]
    assert sorted(covered) == sorted(_BENCHMARKS) == sorted(EXPECTED)


@pytest.mark.usefixtures("quick_corpora")
class TestThroughput:
    BENCHMARKS = ("scan", "realistic", "rescan", "rpc")

    @pytest.mark.timeout(600)  # a benchmark run: minutes on a busy machine
    @pytest.mark.parametrize("name", BENCHMARKS)
    def test_the_benchmark_runs_and_reports(self, name: str, tmp_path: Path) -> None:
        run_benchmark(name, tmp_path)


@pytest.mark.usefixtures("quick_corpora")
class TestLatency:
    BENCHMARKS = ("cancel", "fanout")

    @pytest.mark.timeout(600)
    @pytest.mark.parametrize("name", BENCHMARKS)
    def test_the_benchmark_runs_and_reports(self, name: str, tmp_path: Path) -> None:
        run_benchmark(name, tmp_path)


@pytest.mark.usefixtures("quick_corpora")
class TestScale:
    BENCHMARKS = ("scale", "replicas")

    @pytest.mark.timeout(600)
    @pytest.mark.parametrize("name", BENCHMARKS)
    def test_the_benchmark_runs_and_reports(self, name: str, tmp_path: Path) -> None:
        run_benchmark(name, tmp_path)


@pytest.mark.usefixtures("quick_corpora")
class TestLiveLibrary:
    BENCHMARKS = ("live", "nas")

    @pytest.mark.timeout(600)
    @pytest.mark.parametrize("name", BENCHMARKS)
    def test_the_benchmark_runs_and_reports(self, name: str, tmp_path: Path) -> None:
        run_benchmark(name, tmp_path)
