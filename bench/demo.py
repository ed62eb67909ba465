"""``make demo``: a scan end to end on a generated library, with a real server and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.corpus import make_corpus
from bench.harness import server

LIBRARY = Path(".data/demo-media")


def main() -> int:
    """Generate a library, serve it, scan it with the CLI, list what was found."""
    print(f"generating a library of 600 small videos in {LIBRARY} ...")
    make_corpus(LIBRARY, 600, per_folder=60)
    with server(LIBRARY.resolve()) as running:
        cli = [sys.executable, "-m", "scanjobs.client", "--target", running.target]
        for args in (["scan", str(LIBRARY)], ["videos", "--limit", "8"], ["jobs"]):
            print(f"\n$ scanjobs {' '.join(args)}", flush=True)
            subprocess.run([*cli, *args], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
