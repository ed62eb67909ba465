"""The core every transport shares: the same checks, whichever door a request came in by."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scanjobs.server.catalog import InMemoryCatalog
from scanjobs.server.core import MAX_PAGE_SIZE, ScanJobs
from scanjobs.server.errors import InvalidArgument, NotFound, PermissionDenied
from scanjobs.server.jobs import JobState
from scanjobs.server.queue import AsyncioJobQueue
from scanjobs.server.roots import RootPolicy
from tests.queues import ScriptedHandler, until_state


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[ScanJobs]:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    queue = AsyncioJobQueue(ScriptedHandler())
    await queue.start()
    yield ScanJobs(queue, InMemoryCatalog(), RootPolicy([str(tmp_path / "root")]))
    await queue.close(grace_s=1.0)


async def test_submit_scan_checks_the_path_against_the_roots_then_queues_it(
    core: ScanJobs, tmp_path: Path
) -> None:
    root = tmp_path / "root"

    job = await core.submit_scan(f"{root}/sub/../sub/", recursive=False, request_id="r-1")

    assert job.spec.path == str(root / "sub")
    assert not job.spec.recursive and job.spec.request_id == "r-1"
    assert (await until_state(core.queue, job.id, JobState.COMPLETED)).id == job.id  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        await core.submit_scan(str(tmp_path))
    with pytest.raises(NotFound):
        await core.submit_scan(str(root / "gone"))


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"path": ""}, "path"),
        ({"path": "relative"}, "path"),
        ({"timeout_s": -1.0}, "timeout"),
        ({"timeout_s": 10.0**9}, "timeout"),
        ({"request_id": "x" * 129}, "request_id"),
    ],
)
async def test_submit_scan_refuses_malformed_requests_naming_the_field(
    core: ScanJobs, tmp_path: Path, arguments: dict[str, object], field: str
) -> None:
    request: dict[str, object] = {"path": str(tmp_path / "root"), **arguments}
    path = str(request.pop("path"))
    with pytest.raises(InvalidArgument) as refused:
        await core.submit_scan(path, **request)  # type: ignore[arg-type]
    assert [v.field for v in refused.value.violations] == [field]


async def test_ids_and_page_sizes_are_checked_before_the_queue_is_asked(core: ScanJobs) -> None:
    for call in (core.get_job(""), core.cancel_job("x" * 65), core.watch_job("")):
        with pytest.raises(InvalidArgument):
            await call
    with pytest.raises(InvalidArgument):
        await core.list_jobs(state=None, page_size=-1, page_token="")
    jobs, _ = await core.list_jobs(state=None, page_size=MAX_PAGE_SIZE * 10, page_token="")
    assert jobs == []
