"""The ScanService through a real grpc.aio server and the generated async stub."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from scanjobs.v1 import scanjobs_pb2 as pb
from tests.conftest import (
    ServeFactory,
    gated_library,
    until_running,
    wait_terminal,
    watch_all,
)

TERMINAL = {
    pb.JOB_STATE_COMPLETED,
    pb.JOB_STATE_FAILED,
    pb.JOB_STATE_TIMEOUT,
    pb.JOB_STATE_CANCELLED,
}


async def test_submit_then_watch_reaches_completed_with_exact_counts(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    assert job.state == pb.JOB_STATE_PENDING
    assert job.recursive is True

    events = await watch_all(s.stub, job.id)

    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    assert events[-1].job.state == pb.JOB_STATE_COMPLETED
    result = events[-1].job.result
    assert (result.scanned, result.added, result.failed) == (5, 4, 1)
    assert [e.path for e in result.errors] == [str(media / "garbage.mp4")]
    assert events[-1].job.progress.fraction == 1.0
    assert events[-1].job.HasField("end_time")


async def test_watch_of_a_finished_job_sends_the_snapshot_and_ends(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    final = await wait_terminal(s.stub, job.id)

    late = await watch_all(s.stub, job.id)

    assert len(late) == 1
    assert late[0].job == final


async def test_non_recursive_scan_ignores_subfolders(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media), recursive=False))
    final = await wait_terminal(s.stub, job.id)
    assert final.result.scanned == 3  # a.mp4, b.mkv, garbage.mp4


async def test_list_videos_returns_the_catalog_with_metadata(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    await wait_terminal(s.stub, job.id)

    page = await s.stub.ListVideos(pb.ListVideosRequest(page_size=3))
    rest = await s.stub.ListVideos(pb.ListVideosRequest(page_token=page.next_page_token))

    paths = [v.path for v in [*page.videos, *rest.videos]]
    assert paths == sorted(str(media / n) for n in ("a.mp4", "b.mkv", "sub/c.webm", "sub/d.mov"))
    assert rest.next_page_token == ""
    mkv = next(v for v in page.videos if v.path.endswith("b.mkv"))
    assert (mkv.width, mkv.height, mkv.video_codec, mkv.audio_codec) == (64, 48, "h264", "aac")
    assert (mkv.frame_rate_numerator, mkv.frame_rate_denominator) == (25, 1)
    assert mkv.subtitle_streams == 1
    assert mkv.job_id == job.id
    only_sub = await s.stub.ListVideos(pb.ListVideosRequest(path_prefix=str(media / "sub")))
    assert len(only_sub.videos) == 2


async def test_list_jobs_pages_newest_first_and_filters_by_state(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media)
    ids = []
    for _ in range(3):
        job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
        await wait_terminal(s.stub, job.id)
        ids.append(job.id)

    first = await s.stub.ListJobs(pb.ListJobsRequest(page_size=2))
    second = await s.stub.ListJobs(
        pb.ListJobsRequest(page_size=2, page_token=first.next_page_token)
    )
    running = await s.stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_RUNNING))

    assert [j.id for j in [*first.jobs, *second.jobs]] == ids[::-1]
    assert second.next_page_token == ""
    assert list(running.jobs) == []


async def test_health_and_reflection_are_served(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    health = health_pb2_grpc.HealthStub(s.channel)
    for service in ("", "scanjobs.v1.ScanService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_job_timeout_ends_in_timeout_with_partial_result(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = tmp_path / "slow"
    root.mkdir()
    (root / "gate.mp4").write_bytes(b"x")  # blocks in the probe until the test opens the gate
    s = await serve(root, misbehaving=True)
    timeout = duration_pb2.Duration(nanos=200_000_000)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root), timeout=timeout))

    final = await wait_terminal(s.stub, job.id)

    assert final.state == pb.JOB_STATE_TIMEOUT
    assert "timeout" in final.error
    assert final.result.scanned == 0


def _details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason = ""
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "scanjobs"
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "PATH_REQUIRED"),
        ("relative/dir", grpc.StatusCode.INVALID_ARGUMENT, "PATH_NOT_ABSOLUTE"),
        ("/etc", grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS"),
        ("/no/such/place/outside", grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS"),
        ("{root}/../..", grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS"),
        ("{root}/missing", grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND"),
        ("{root}/a.mp4", grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_DIRECTORY"),
        ("{root}/\x00x", grpc.StatusCode.INVALID_ARGUMENT, "PATH_INVALID"),
    ],
)
async def test_submit_errors_carry_code_and_reason(
    serve: ServeFactory, media: Path, path: str, code: grpc.StatusCode, reason: str
) -> None:
    s = await serve(media)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await s.stub.SubmitScan(pb.SubmitScanRequest(path=path.format(root=media)))
    assert caught.value.code() == code
    got_reason, fields = _details(caught.value)
    assert got_reason == reason
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert fields == ["path"]


@pytest.mark.parametrize("rpc", ["GetJob", "CancelJob", "WatchJob"])
async def test_unknown_job_is_not_found_and_empty_id_is_invalid(
    serve: ServeFactory, media: Path, rpc: str
) -> None:
    s = await serve(media)
    request_type = {
        "GetJob": pb.GetJobRequest,
        "CancelJob": pb.CancelJobRequest,
        "WatchJob": pb.WatchJobRequest,
    }[rpc]
    for job_id, code in (
        ("0123456789abcdef", grpc.StatusCode.NOT_FOUND),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        call = getattr(s.stub, rpc)(request_type(job_id=job_id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if rpc == "WatchJob":
                [e async for e in call]
            else:
                await call
        assert caught.value.code() == code


async def test_bad_page_token_and_page_size_are_invalid(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    for call in (
        s.stub.ListJobs(pb.ListJobsRequest(page_token="garbage")),
        s.stub.ListJobs(pb.ListJobsRequest(page_size=-1)),
        s.stub.ListVideos(pb.ListVideosRequest(page_token="garbage")),
        s.stub.ListVideos(pb.ListVideosRequest(page_size=-5)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_too_many_pending_jobs_is_resource_exhausted(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = gated_library(tmp_path / "gated")
    s = await serve(root, misbehaving=True, workers=1, max_pending=2)
    running = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await until_running(s.stub, running.id)
    for _ in range(2):
        await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _details(caught.value)[0] == "TOO_MANY_PENDING_JOBS"
    (root / "open-gate").touch()


async def test_max_jobs_drops_the_oldest_ended_job_then_refuses_when_none_ended(
    serve: ServeFactory, tmp_path: Path, media: Path
) -> None:
    root = gated_library(tmp_path / "gated")
    s = await serve(tmp_path, misbehaving=True, workers=1, max_jobs=2)
    oldest = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    await wait_terminal(s.stub, oldest.id)
    blocked = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await until_running(s.stub, blocked.id)

    waiting = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))  # drops oldest
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await s.stub.GetJob(pb.GetJobRequest(job_id=oldest.id))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))

    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _details(refused.value)[0] == "TOO_MANY_JOBS"
    listed = await s.stub.ListJobs(pb.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [waiting.id, blocked.id]
    (root / "open-gate").touch()


async def test_bad_timeout_and_request_id_are_invalid(serve: ServeFactory, media: Path) -> None:
    s = await serve(media)
    for request, field in (
        (
            pb.SubmitScanRequest(path=str(media), timeout=duration_pb2.Duration(seconds=-1)),
            "timeout",
        ),
        (pb.SubmitScanRequest(path=str(media), request_id="x" * 129), "request_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.stub.SubmitScan(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(caught.value)[1] == [field]
