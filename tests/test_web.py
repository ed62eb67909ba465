"""The page's sources: the committed bundle is what `make web` builds, and its state logic
passes its own unit tests (vitest, with a TypeScript type check first)."""

from __future__ import annotations

import filecmp
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
STATIC = ROOT / "server" / "static"
NPM = shutil.which("npm")

pytestmark = [
    pytest.mark.skipif(NPM is None, reason="npm is not installed here (.ci/run installs it)"),
    pytest.mark.timeout(300),
]


def _npm(*args: str) -> subprocess.CompletedProcess[str]:
    assert NPM is not None
    return subprocess.run([NPM, *args], cwd=WEB, capture_output=True, text=True, timeout=280)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """web/node_modules exactly as package-lock.json pins it: installed again whenever the
    lock changed since the last install."""
    lock = hashlib.sha256((WEB / "package-lock.json").read_bytes()).hexdigest()
    stamp = WEB / "node_modules" / ".installed-from-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        done = _npm("ci", "--no-audit", "--no-fund")
        assert done.returncode == 0, done.stderr
        stamp.write_text(lock)
    generated = _npm("run", "generate")
    assert generated.returncode == 0, generated.stderr
    return WEB / "node_modules"


def test_committed_page_bundle_is_what_make_web_builds(node_modules: Path, tmp_path: Path) -> None:
    built = subprocess.run(
        ["node", "build.mjs", str(tmp_path)], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(STATIC) for p in STATIC.rglob("*") if p.is_file())
    assert fresh == committed, "run `make web`"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, STATIC, [str(p) for p in fresh], shallow=False)
    assert mismatch == [] and errors == [], f"run `make web`: stale {mismatch + errors}"


def test_page_state_logic_passes_its_type_check_and_unit_tests(node_modules: Path) -> None:
    done = _npm("test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout and "failed" not in done.stdout
