"""The checks every transport shares (``server.intake``): the same whichever door a request
came in by, with no transport involved."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scanjobs.server import intake
from scanjobs.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    IoTimeout,
    NotFound,
    PermissionDenied,
)
from scanjobs.server.jobs import JobState
from scanjobs.server.queue import AsyncioJobQueue
from scanjobs.server.rootcheck import RootChecks
from scanjobs.server.roots import RootPolicy
from tests.queues import ScriptedHandler, until_state


@pytest.fixture
async def queue() -> AsyncIterator[AsyncioJobQueue]:
    q = AsyncioJobQueue(ScriptedHandler())
    await q.start()
    yield q
    await q.close(grace_s=1.0)


async def test_submit_scan_checks_the_path_against_the_roots_then_queues_it(
    queue: AsyncioJobQueue, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    checks = RootChecks([str(root)], timeout_s=10.0)
    spec = intake.job_spec(f"{root}/sub/../sub/", recursive=False, request_id="r-1")

    job = await intake.submit_scan(queue, checks, spec)

    assert job.spec.path == str(root / "sub")
    assert not job.spec.recursive and job.spec.request_id == "r-1"
    assert (await until_state(queue, job.id, JobState.COMPLETED)).id == job.id
    with pytest.raises(PermissionDenied):
        await intake.submit_scan(queue, checks, intake.job_spec(str(tmp_path)))
    with pytest.raises(NotFound):
        await intake.submit_scan(queue, checks, intake.job_spec(str(root / "gone")))
    await checks.close()


@pytest.mark.parametrize(
    ("path", "arguments", "field"),
    [
        ("", {}, "path"),
        ("relative", {}, "path"),
        ("/srv", {"timeout_s": -1.0}, "timeout"),
        ("/srv", {"timeout_s": 10.0**9}, "timeout"),
        ("/srv", {"request_id": "x" * 129}, "request_id"),
    ],
)
def test_job_spec_refuses_malformed_requests_naming_the_field(
    path: str, arguments: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        intake.job_spec(path, **arguments)  # type: ignore[arg-type]
    assert [v.field for v in refused.value.violations] == [field]


def test_ids_and_page_sizes_are_checked() -> None:
    for raw in ("", "x" * 65):
        with pytest.raises(InvalidArgument):
            intake.job_id(raw)
    with pytest.raises(InvalidArgument):
        intake.page_size(-1, default=50)
    assert intake.page_size(0, default=50) == 50
    assert intake.page_size(10**6, default=50) == intake.MAX_PAGE_SIZE


async def test_the_root_check_helper_finds_a_folder_as_the_root_policy_does(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "sub \udcff").mkdir(parents=True)
    (root / "file").write_bytes(b"")
    checks = RootChecks([str(root)], timeout_s=10.0)
    try:
        found = await checks.locate(f"{root}/sub \udcff/")
        with pytest.raises(FailedPrecondition) as not_a_folder:
            await checks.check(str(root / "file"))
    finally:
        await checks.close()

    assert found == RootPolicy([str(root)]).locate(f"{root}/sub \udcff/")
    assert not_a_folder.value.reason == "NOT_A_DIRECTORY"


# A root check helper that waits, before it starts, until the file named first exists.
_LATE_HELPER = """
import os, runpy, sys, time
gate = sys.argv.pop(1)
while not os.path.exists(gate):
    time.sleep(0.01)
runpy.run_module("scanjobs.server.rootcheck", run_name="__main__")
"""


async def test_the_io_timeout_counts_from_when_the_helper_can_check_not_from_its_start(
    tmp_path: Path,
) -> None:
    root, gate = tmp_path / "root", tmp_path / "open-gate"
    root.mkdir()
    command = (sys.executable, "-c", _LATE_HELPER, str(gate))
    checks = RootChecks([str(root)], timeout_s=0.2, command=command)
    try:
        # The caller's own deadline counts everything, start-up included (the helper starts
        # with the first check, and resolves the roots before it checks anything).
        with pytest.raises(IoTimeout):
            await checks.check(str(root), timeout_s=0.2)
        check = asyncio.create_task(checks.check(str(root)))
        done, _ = await asyncio.wait([check], timeout=1.0)  # 5 times --io-timeout
        assert not done, check.result()
        gate.touch()
        found = await check
    finally:
        await checks.close()

    assert found == str(root)
