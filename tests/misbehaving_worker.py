"""A probe worker that misbehaves on purpose, chosen by the file's name.

``hang`` never answers; ``crash`` kills the worker; ``gate`` waits until a file named
``open-gate`` exists next to it (so a test decides when the probe finishes); anything else is
probed for real. A ``hang`` or ``gate`` file being probed is announced by a file next to it
named ``<name>.probing``, so that a test waits for exactly that. Run as
``python tests/misbehaving_worker.py``.
"""

from __future__ import annotations

import os
import sys
import time

from scanjobs.server import probe


def _probe(target: probe.ProbeTarget) -> probe.ProbeOutcome:
    name = os.path.basename(target.path)
    if b"hang" in name or b"gate" in name:
        with open(target.path + b".probing", "wb"):
            pass
    if b"hang" in name:
        time.sleep(3600)
    if b"crash" in name:
        os._exit(70)
    if b"gate" in name:
        gate = os.path.join(os.path.dirname(target.path), b"open-gate")
        while not os.path.exists(gate):
            time.sleep(0.005)
    return probe.probe_file(target)


if __name__ == "__main__":
    probe._serve(sys.stdin.buffer, sys.stdout.buffer, _probe)
