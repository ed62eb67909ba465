"""A probe worker that misbehaves on purpose, chosen by the file's name.

``hang`` never answers; ``crash`` kills the worker; ``gate`` (or a file whose content starts
with ``GATE``) waits until a file named ``open-gate`` exists next to it (so a test decides
when the probe finishes); ``oversized``
announces a reply far over the size limit; ``pickle`` replies with a pickle that would create
a file named ``unpickled`` next to it if the server ever unpickled it; ``report`` replies with
its environment, address-space limit and identity; ``allocate`` tries to allocate 1 GiB;
anything else is probed for real. A ``hang`` or ``gate`` file being probed is announced by a
file next to it named ``<name>.probing``, so that a test waits for exactly that. Run as
``python tests/misbehaving_worker.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import time

from scanjobs.server import probe, probe_worker
from scanjobs.server.probe_wire import FRAME


class _CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def _send_and_hang(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    time.sleep(3600)


def _report() -> probe.ProbeFailure:
    return probe.ProbeFailure(
        json.dumps(
            {
                "env": sorted(os.environ),
                "address_space": resource.getrlimit(resource.RLIMIT_AS)[0],
            }
        )
    )


def _allocate() -> probe.ProbeFailure:
    try:
        block = bytearray(2**30)
    except MemoryError:
        return probe.ProbeFailure("allocation refused")
    return probe.ProbeFailure(f"allocated {len(block)} bytes")


def _gated_by_content(path: bytes) -> bool:
    """A file whose content starts with ``GATE`` is a gate whatever its name (a test picks
    it by its place in a listing, which a rename would change)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GATE"
    except OSError:
        return False


def _hold(target: probe.ProbeTarget, name: bytes) -> None:
    """Announce a ``hang`` or ``gate`` file, then hang, or wait for its gate."""
    with open(target.path + b".probing", "wb"):
        pass
    if b"hang" in name:
        time.sleep(3600)
    gate = os.path.join(os.path.dirname(target.path), b"open-gate")
    while not os.path.exists(gate):
        time.sleep(0.005)


def _probe(target: probe.ProbeTarget) -> probe.ProbeOutcome:
    name = os.path.basename(target.path)
    folder = os.path.dirname(target.path)
    if _gated_by_content(target.path):
        name += b"-gate"  # behaves as a gate file
    if b"crash" in name:
        os._exit(70)
    if b"oversized" in name:
        _send_and_hang(FRAME.pack(10 * 2**20) + b"x" * 4096)
    if b"pickle" in name:
        payload = pickle.dumps(_CreatesAFile(os.fsdecode(os.path.join(folder, b"unpickled"))))
        _send_and_hang(FRAME.pack(len(payload)) + payload)
    if b"report" in name:
        return _report()
    if b"allocate" in name:
        return _allocate()
    if b"hang" in name or b"gate" in name:
        _hold(target, name)
    return probe.probe_file(target)


if __name__ == "__main__":
    probe_worker.serve(sys.stdin.buffer, sys.stdout.buffer, _probe)
