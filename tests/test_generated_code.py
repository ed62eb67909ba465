"""The committed generated code matches what `make proto` would write from protos/ today."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "gen")
        for p in (ROOT / "gen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path, ROOT / "gen", [str(p) for p in fresh], shallow=False
    )
    assert mismatch == [] and errors == [], f"run `make proto`: stale {mismatch + errors}"
