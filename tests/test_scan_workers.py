"""Scan workers own directories end to end: what a job reports is what they committed, even
when one is cancelled or killed mid-directory; huge and deep folders stay streaming."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import Running, ServeFactory, eventually, probing, wait_terminal
from tests.media import write_video


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Server overrides that choose the catalog's backend."""
    if request.param == "postgres":
        return {"database": request.getfixturevalue("postgres_url")}
    return {}


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_video(tmp_path / "sample.mp4")


def _videos(sample: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"v{n:04}.mp4" for n in range(count)]
    for path in paths:
        shutil.copyfile(sample, path)
    return paths


async def _catalogued(s: Running, job_id: str = "") -> set[str]:
    paths: set[str] = set()
    token = ""
    while True:
        reply = await s.stub.ListVideos(
            pb.ListVideosRequest(job_id=job_id, page_size=1000, page_token=token)
        )
        paths.update(v.path for v in reply.videos)
        token = reply.next_page_token
        if not token:
            return paths


@pytest.fixture(scope="module")
def huge_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One folder of 100,000 entries (1,000 videos among 99,000 other files), and the video
    deep in its listing that holds its probe; built once for both backends (a scan only reads
    it)."""
    big = tmp_path_factory.mktemp("huge") / "lib" / "big"
    sample = write_video(big.parent.parent / "sample.mp4")
    _videos(sample, big, 1000)
    for n in range(99_000):
        os.close(os.open(big / f"note{n:05}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    order = [big / name for name in os.listdir(big) if name.endswith(".mp4")]
    held = order[700]  # the probes run in listing order, in chunks of 128
    held.write_bytes(b"GATE" + bytes(100))
    return big, held


async def test_a_cancel_mid_directory_leaves_the_result_equal_to_the_catalog(
    serve: ServeFactory, huge_folder: tuple[Path, Path], backend: dict[str, Any]
) -> None:
    # The chunks before the held file are in the catalog when the job is cancelled, and the
    # job says exactly that many.
    big, held = huge_folder
    held.with_name(held.name + ".probing").unlink(missing_ok=True)  # left by an earlier run
    s = await serve(big.parent, misbehaving=True, probe_processes=1, **backend)

    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(big.parent)))
    await eventually(lambda: probing(held), "the held file is being probed")
    await s.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = await wait_terminal(s.stub, job.id)
    catalogued = await _catalogued(s, job.id)

    assert final.state == pb.JOB_STATE_CANCELLED
    assert final.progress.files_found == 1000
    assert 128 <= final.result.added <= 700
    assert final.result.added == len(catalogued) == final.progress.files_done
    assert str(held) not in catalogued


async def test_a_scan_worker_killed_by_the_os_loses_nothing_it_committed(
    serve: ServeFactory, tmp_path: Path, sample: Path, backend: dict[str, Any]
) -> None:
    # One worker: ``a`` is done and committed before it takes ``a/b``, where it is killed
    # while a probe holds it.
    lib = tmp_path / "lib"
    done = _videos(sample, lib / "a", 20)
    lost = _videos(sample, lib / "a" / "b", 5)
    gate = lib / "a" / "b" / "gate.mp4"
    shutil.copyfile(sample, gate)
    s = await serve(lib, misbehaving=True, probe_processes=1, **backend)
    (worker,) = s.app.workers.pids()

    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(lib)))
    await eventually(lambda: probing(gate), "the worker is inside a/b")
    os.kill(worker, signal.SIGKILL)
    final = await wait_terminal(s.stub, job.id)

    assert final.state == pb.JOB_STATE_COMPLETED
    assert final.result.added == 20
    assert await _catalogued(s) == {str(p) for p in done}
    assert [e.path for e in final.result.errors] == [str(gate.parent)]
    assert "died" in final.result.errors[0].message

    # Its replacement (and only it) takes the next job; its probe process was killed with it.
    await eventually(lambda: s.app.workers.background_tasks == 0, "the worker is replaced")
    (gate.parent / "open-gate").touch()
    again = await wait_terminal(
        s.stub, (await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(lib)))).id
    )
    assert (again.result.added, again.result.unchanged) == (len(lost) + 1, 20)
    assert len(s.app.workers.pids()) == 1


async def test_a_deep_tree_is_handed_out_folder_by_folder(
    serve: ServeFactory, tmp_path: Path, sample: Path
) -> None:
    lib = tmp_path / "lib"
    folder, expected = lib, set()
    for depth in range(60):
        folder = folder / f"level{depth:02}"
        expected.add(str(_videos(sample, folder, 1)[0]))
    s = await serve(lib)

    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(lib)))
    final = await wait_terminal(s.stub, job.id)

    assert final.state == pb.JOB_STATE_COMPLETED
    assert (final.result.added, final.progress.files_found) == (60, 60)
    assert await _catalogued(s) == expected
