"""Worker processes started off the event loop (server/spawn.py): pipes, exit, and a start
that is cancelled half-way leaves nothing running."""

from __future__ import annotations

import asyncio
import os
import sys

from scanjobs.server.spawn import start
from tests.conftest import eventually

ECHO = (sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.readline())")


def _children() -> set[int]:
    """Our live (not zombie) children's pids."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(pid))
    return found


async def test_a_child_talks_through_its_pipes_and_its_exit_is_seen() -> None:
    child = await start(ECHO)
    child.stdin.write(b"hello\n")
    await child.stdin.drain()
    assert await child.stdout.readline() == b"hello\n"
    assert await asyncio.wait_for(child.wait(), 30) == 0
    assert child.returncode == 0
    child.kill()  # once reaped, a kill is a no-op: the pid may be another process's now


async def test_a_killed_child_exits_with_the_signal() -> None:
    child = await start((sys.executable, "-c", "import time; time.sleep(60)"))
    child.kill()
    assert await asyncio.wait_for(child.wait(), 30) == -9


async def test_a_start_cancelled_half_way_leaves_no_process_running() -> None:
    before = _children()
    for _ in range(5):
        starting = asyncio.create_task(start((sys.executable, "-c", "import time; time.sleep(60)")))
        await asyncio.sleep(0)  # the fork runs on a thread: cancel while it does
        starting.cancel()
        try:
            child = await starting
        except asyncio.CancelledError:
            continue
        child.kill()  # it finished starting before the cancel arrived
        await child.wait()
    await eventually(lambda: _children() <= before, "the children started then cancelled exited")
