"""Hostile input, authentication, TLS and limits, through a real server.

The library under the allowed root holds symlinks that escape to a folder outside it, where a
sentinel file waits. Its access time is set far in the past, so any read of it would move its
atime (relatime updates an atime older than the mtime): after every case the test checks that
nothing outside the roots was opened.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from scanjobs.client import ScanClient, ServiceUnavailable, TlsFiles
from scanjobs.server.config import parse_args
from scanjobs.server.logs import TextFormatter
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.certs import Authority
from tests.conftest import (
    Running,
    ServeFactory,
    eventually,
    gated_library,
    start_running,
    stop_running,
    until_running,
)
from tests.media import write_video

TOKEN = "correct-horse-battery-staple"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
Code = grpc.StatusCode


@dataclass
class World:
    root: Path
    outside: Path
    sentinel: Path
    job_id: str
    s: Running
    sentinel_read_by_the_scan: bool


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """One server for the module's cases: each makes calls that leave the server as it was
    (or adds jobs no other case counts), so none needs a server of its own."""
    tmp_path = tmp_path_factory.mktemp("world")
    root, outside = tmp_path / "lib", tmp_path / "lib-outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    write_video(root / "a.mp4")
    sentinel = outside / "secret.mp4"
    write_video(sentinel)
    (root / "escape.mp4").symlink_to(sentinel)
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up.mp4").symlink_to("../../lib-outside/secret.mp4")
    (tmp_path / "libevil").mkdir()  # shares the root's name as a prefix
    _age_access_time(sentinel)
    s = await start_running(
        root, tmp_path / "data", tokens=frozenset({TOKEN, "second-token"}), max_message_bytes=8192
    )
    try:
        job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)), metadata=GOOD)
        async for _ in s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), metadata=GOOD):
            pass
        read = sentinel.stat().st_atime_ns != _FAR_PAST_NS
        yield World(root, outside, sentinel, job.id, s, read)
    finally:
        await stop_running(s)


@pytest.fixture
def world(shared_world: World) -> World:
    """The shared server, with the sentinel's access time set far in the past again (a read
    moves it only while it is older than the modification time)."""
    _age_access_time(shared_world.sentinel)
    return shared_world


_FAR_PAST_NS = 10**9


def _age_access_time(path: Path) -> None:
    os.utime(path, ns=(_FAR_PAST_NS, path.stat().st_mtime_ns))


# The tests on the shared server run in its event loop.
in_world = pytest.mark.asyncio(loop_scope="module")


Call = Callable[["pb_grpc.ScanServiceAsyncStub", World], Awaitable[Any]]


def submit(path: str, **fields: Any) -> Call:
    def call(stub: pb_grpc.ScanServiceAsyncStub, w: World) -> Awaitable[Any]:
        request = pb.SubmitScanRequest(path=path.format(root=w.root), **fields)
        return stub.SubmitScan(request, metadata=GOOD)

    return call


def unary(method: str, metadata: tuple[tuple[str, str], ...] = GOOD, **fields: Any) -> Call:
    requests = {
        "GetJob": pb.GetJobRequest,
        "CancelJob": pb.CancelJobRequest,
        "ListJobs": pb.ListJobsRequest,
        "ListVideos": pb.ListVideosRequest,
    }

    def call(stub: pb_grpc.ScanServiceAsyncStub, w: World) -> Awaitable[Any]:
        values = {
            k: (v.format(job=w.job_id) if isinstance(v, str) else v) for k, v in fields.items()
        }
        return getattr(stub, method)(requests[method](**values), metadata=metadata)

    return call


def watch(job_id: str, after: int = 0) -> Call:
    async def call(stub: pb_grpc.ScanServiceAsyncStub, w: World) -> Any:
        request = pb.WatchJobRequest(job_id=job_id.format(job=w.job_id), after_sequence=after)
        return [e async for e in stub.WatchJob(request, metadata=GOOD)]

    return call


def raw(method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = GOOD) -> Call:
    async def call(stub: pb_grpc.ScanServiceAsyncStub, w: World) -> Any:
        invoke = w.s.channel.unary_unary(f"/scanjobs.v1.ScanService/{method}")
        return await invoke(payload, metadata=metadata)

    return call


def token(metadata: tuple[tuple[str, str], ...]) -> Call:
    return unary("ListJobs", metadata=metadata)


def _token_for(state: str) -> str:
    return base64.urlsafe_b64encode(f"v1|5|{state}".encode()).decode().rstrip("=")


CASES: list[tuple[str, Call, Code]] = [
    # paths
    ("empty path", submit(""), Code.INVALID_ARGUMENT),
    ("relative path", submit("media/films"), Code.INVALID_ARGUMENT),
    ("dot-relative path", submit("./lib"), Code.INVALID_ARGUMENT),
    ("NUL byte", submit("{root}/a\x00b"), Code.INVALID_ARGUMENT),
    ("over-long path", submit("/" + "a" * 5000), Code.INVALID_ARGUMENT),
    ("outside, exists", submit("/etc"), Code.PERMISSION_DENIED),
    ("outside, missing", submit("/etc/shadow-dir"), Code.PERMISSION_DENIED),
    ("dot-dot escape", submit("{root}/../lib-outside"), Code.PERMISSION_DENIED),
    ("dot-dot escape, missing", submit("{root}/../nowhere"), Code.PERMISSION_DENIED),
    ("deep dot-dot", submit("{root}/sub/../../../../etc"), Code.PERMISSION_DENIED),
    ("prefix sibling", submit("{root}evil"), Code.PERMISSION_DENIED),
    ("symlinked dir escape", submit("{root}/escape-dir"), Code.PERMISSION_DENIED),
    ("inside symlinked dir", submit("{root}/escape-dir/x"), Code.PERMISSION_DENIED),
    ("missing inside", submit("{root}/missing"), Code.NOT_FOUND),
    ("a file, not a folder", submit("{root}/a.mp4"), Code.FAILED_PRECONDITION),
    ("repeated slashes are fine", submit("{root}//sub///", recursive=False), Code.OK),
    ("the root with escaping links", submit("{root}"), Code.OK),
    ("bad UTF-8 in path", raw("SubmitScan", b"\x0a\x03/\xff\xfe"), Code.INVALID_ARGUMENT),
    ("not a protobuf", raw("GetJob", b"\xff\xff\xff\xff"), Code.INVALID_ARGUMENT),
    ("negative timeout", submit("{root}", timeout=duration_pb2.Duration(seconds=-5)),
     Code.INVALID_ARGUMENT),
    ("absurd timeout", submit("{root}", timeout=duration_pb2.Duration(seconds=10**9)),
     Code.INVALID_ARGUMENT),
    ("long request_id", submit("{root}", request_id="r" * 500), Code.INVALID_ARGUMENT),
    ("oversized message", submit("/" + "b" * 20_000), Code.RESOURCE_EXHAUSTED),
    # ids
    ("empty job id", unary("GetJob", job_id=""), Code.INVALID_ARGUMENT),
    ("long job id", unary("GetJob", job_id="a" * 65), Code.INVALID_ARGUMENT),
    ("path-like job id", unary("GetJob", job_id="../../etc/passwd"), Code.NOT_FOUND),
    ("unknown cancel", unary("CancelJob", job_id="f" * 32), Code.NOT_FOUND),
    ("cancel an ended job", unary("CancelJob", job_id="{job}"), Code.FAILED_PRECONDITION),
    ("unknown watch", watch("0" * 32), Code.NOT_FOUND),
    ("watch from the future", watch("{job}", after=10**6), Code.INVALID_ARGUMENT),
    # pages
    ("garbage page token", unary("ListJobs", page_token="%%%"), Code.INVALID_ARGUMENT),
    ("token of another filter", unary("ListJobs", page_token=_token_for("COMPLETED")),
     Code.INVALID_ARGUMENT),
    ("garbage video token", unary("ListVideos", page_token="nope"), Code.INVALID_ARGUMENT),
    ("negative page size", unary("ListJobs", page_size=-1), Code.INVALID_ARGUMENT),
    ("huge page size is capped", unary("ListVideos", page_size=2**31 - 1), Code.OK),
    ("unknown state filter", unary("ListJobs", state=99), Code.INVALID_ARGUMENT),
    # tokens
    ("no token", token(()), Code.UNAUTHENTICATED),
    ("wrong token", token((("authorization", "Bearer guess"),)), Code.UNAUTHENTICATED),
    ("empty bearer", token((("authorization", "Bearer "),)), Code.UNAUTHENTICATED),
    ("basic auth", token((("authorization", f"Basic {TOKEN}"),)), Code.UNAUTHENTICATED),
    ("token without scheme", token((("authorization", TOKEN),)), Code.UNAUTHENTICATED),
    ("token with extra text", token((("authorization", f"Bearer {TOKEN}x"),)),
     Code.UNAUTHENTICATED),
    ("token as another header", token((("x-token", TOKEN),)), Code.UNAUTHENTICATED),
    ("second token works", token((("authorization", "Bearer second-token"),)), Code.OK),
    ("raw call without token", raw("ListJobs", b"", metadata=()), Code.UNAUTHENTICATED),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "code"), CASES, ids=[c[0] for c in CASES])
@in_world
async def test_hostile_input(world: World, name: str, call: Call, code: Code) -> None:
    before = world.sentinel.stat().st_atime_ns
    try:
        result = await call(world.s.stub, world)
        got = Code.OK
    except grpc.aio.AioRpcError as exc:
        got, result = exc.code(), exc
    if got == Code.OK and isinstance(result, pb.Job):  # let a started scan run to its end
        async for _ in world.s.stub.WatchJob(pb.WatchJobRequest(job_id=result.id), metadata=GOOD):
            pass
    assert got == code, result
    if isinstance(result, grpc.aio.AioRpcError):
        assert "Traceback" not in (result.details() or "")
    assert world.sentinel.stat().st_atime_ns == before, "a file outside the roots was read"


@in_world
async def test_the_sentinel_would_show_a_read(world: World) -> None:
    """Calibrates the check above: a read of the sentinel does move its access time."""
    before = world.sentinel.stat().st_atime_ns
    world.sentinel.read_bytes()
    assert world.sentinel.stat().st_atime_ns != before


@in_world
async def test_a_scan_reports_escaping_links_without_following_them(world: World) -> None:
    job = await world.s.stub.GetJob(pb.GetJobRequest(job_id=world.job_id), metadata=GOOD)
    errors = {Path(e.path).name: e.message for e in job.result.errors}
    assert errors == {
        "escape.mp4": "symlink points outside the allowed roots",
        "up.mp4": "symlink points outside the allowed roots",
    }
    assert job.result.added == 1
    assert not world.sentinel_read_by_the_scan


@in_world
async def test_health_and_reflection_stay_open_without_a_token(world: World) -> None:
    health = health_pb2_grpc.HealthStub(world.s.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="scanjobs.v1.ScanService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(world.s.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert "scanjobs.v1.ScanService" in names


@in_world
async def test_tokens_never_reach_the_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    await world.s.stub.ListJobs(pb.ListJobsRequest(), metadata=GOOD)
    with pytest.raises(grpc.aio.AioRpcError):
        await world.s.stub.ListJobs(
            pb.ListJobsRequest(), metadata=(("authorization", "Bearer wrong-guess"),)
        )
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert TOKEN not in text and "wrong-guess" not in text
    assert "method=ListJobs" in text or "ListJobs" in text


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, rogue = Authority(folder, "ca"), Authority(folder, "rogue-ca")
    return {
        "ca": ca.pair.cert,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue": rogue.issue("rogue-client", server=False),
    }


async def _get_jobs(address: str, tls: TlsFiles | None) -> str:
    try:
        async with ScanClient(address, tls=tls, timeout_s=3) as client:
            [j async for j in client.list_jobs(limit=1)]
    except ServiceUnavailable:
        return "refused"
    return "ok"


async def test_tls_serves_only_clients_that_trust_it(
    serve: ServeFactory, media: Path, pki: dict[str, Any]
) -> None:
    server = pki["server"]
    s = await serve(media, tls_cert=server.cert, tls_key=server.key)
    assert await _get_jobs(s.address, TlsFiles(ca=pki["ca"])) == "ok"
    assert await _get_jobs(s.address, None) == "refused"  # plaintext
    assert await _get_jobs(s.address, TlsFiles()) == "refused"  # system CAs do not know ours


async def test_mutual_tls_requires_a_client_certificate_from_our_ca(
    serve: ServeFactory, media: Path, pki: dict[str, Any]
) -> None:
    server, client, rogue = pki["server"], pki["client"], pki["rogue"]
    s = await serve(media, tls_cert=server.cert, tls_key=server.key, tls_client_ca=pki["ca"])
    good = TlsFiles(ca=pki["ca"], cert=client.cert, key=client.key)
    assert await _get_jobs(s.address, good) == "ok"
    assert await _get_jobs(s.address, TlsFiles(ca=pki["ca"])) == "refused"
    assert await _get_jobs(s.address, TlsFiles(pki["ca"], rogue.cert, rogue.key)) == "refused"


async def test_cli_speaks_mutual_tls_with_a_token(
    serve: ServeFactory, media: Path, pki: dict[str, Any], tmp_path: Path
) -> None:
    server, client = pki["server"], pki["client"]
    s = await serve(
        media,
        tls_cert=server.cert,
        tls_key=server.key,
        tls_client_ca=pki["ca"],
        tokens=frozenset({TOKEN}),
    )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scanjobs.client", "--target", s.address,
        "--token-file", str(token_file),
        "--tls-ca", str(pki["ca"]), "--tls-cert", str(client.cert), "--tls-key", str(client.key),
        "scan", str(media),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "COMPLETED" in out.decode()


# -- start-up refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls-cert", "/x.crt"],
        ["--tls-client-ca", "/ca.crt"],
        ["--token-file", "/no/such/file"],
    ],
)
def test_inconsistent_security_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--root", "/srv", *argv])


# -- limits ------------------------------------------------------------------------------------


async def test_submit_flood_respects_max_pending_and_health_keeps_answering(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = gated_library(tmp_path / "lib")
    s = await serve(root, misbehaving=True, workers=1, max_pending=50)
    first = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    await until_running(s.stub, first.id)
    health = health_pb2_grpc.HealthStub(s.channel)

    async def one() -> grpc.StatusCode:
        try:
            await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def checks() -> list[int]:
        replies = []
        for _ in range(20):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=20)
            replies.append(reply.status)
        return replies

    results, statuses = await asyncio.gather(asyncio.gather(*(one() for _ in range(500))), checks())
    listed = await s.stub.ListJobs(pb.ListJobsRequest(page_size=1000))

    assert results.count(grpc.StatusCode.OK) == 50
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 450
    assert len(listed.jobs) == 51
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
    (root / "open-gate").touch()


async def test_watcher_limits_are_resource_exhausted(serve: ServeFactory, tmp_path: Path) -> None:
    root = gated_library(tmp_path / "lib")
    s = await serve(root, misbehaving=True, max_watchers=3, max_watchers_per_job=2)
    a = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    b = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    open_calls = []
    for job_id in (a.id, a.id, b.id):
        call = s.stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
        await call.read()
        open_calls.append(call)

    codes = []
    for job_id in (a.id, b.id):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [e async for e in s.stub.WatchJob(pb.WatchJobRequest(job_id=job_id))]
        codes.append(caught.value.code())
    for call in open_calls:
        call.cancel()
    (root / "open-gate").touch()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def test_errors_kept_per_job_are_bounded_and_the_rest_counted(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    for n in range(30):
        (root / f"junk{n:02}.mp4").write_bytes(b"junk")
    s = await serve(root, max_errors=5)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(root)))
    events = [e async for e in s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id))]
    result = events[-1].job.result
    assert (len(result.errors), result.error_count, result.failed) == (5, 30, 30)


async def test_health_watch_streams_are_capped_even_without_a_token(
    serve: ServeFactory, media: Path
) -> None:
    s = await serve(media, tokens=frozenset({TOKEN}), max_watchers=10, max_health_watchers=10)
    health = health_pb2_grpc.HealthStub(s.channel)  # one connection, no token
    calls = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(40)]

    async def first(call: Any) -> str:
        try:
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {_reason(exc)}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    outcomes = await asyncio.gather(*(first(c) for c in calls))
    for call in calls:
        call.cancel()
    assert outcomes.count("SERVING") == 10
    assert outcomes.count("RESOURCE_EXHAUSTED TOO_MANY_WATCHERS") == 30


async def test_one_connection_holds_at_most_100_streams(serve: ServeFactory, media: Path) -> None:
    s = await serve(media, max_health_watchers=1000, max_streams_per_connection=100)
    health = health_pb2_grpc.HealthStub(s.channel)
    await health.Check(health_pb2.HealthCheckRequest())  # the client learns the server's limit
    calls = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(130)]
    reads = [asyncio.ensure_future(c.read()) for c in calls]
    served: set[asyncio.Future[Any]] = set()
    while len(served) < 100:  # until the connection is full
        done, _ = await asyncio.wait(set(reads) - served, return_when=asyncio.FIRST_COMPLETED)
        served |= {r for r in done if not r.exception()}
    _, still = await asyncio.wait(set(reads) - served, timeout=1.0)
    refused = [r for r in reads if r not in served and r not in still]
    for call in calls:
        call.cancel()
    # The rest wait on the client's side or are refused (REFUSED_STREAM): never served.
    assert len(served) == 100
    assert all(isinstance(r.exception(), grpc.aio.AioRpcError) for r in refused)
    assert len(still) + len(refused) == 30


FORGED = "x\r\n10:44:01 WARNING token accepted user=admin"


async def test_a_forged_log_line_in_a_job_id_stays_on_one_escaped_line(
    serve: ServeFactory, media: Path
) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("scanjobs")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        s = await serve(media, tokens=frozenset({TOKEN}))
        for metadata in ((), GOOD):
            with pytest.raises(grpc.aio.AioRpcError):
                await s.stub.GetJob(pb.GetJobRequest(job_id=FORGED), metadata=metadata)
        # A call's line is written once it is answered: the client may hear first.
        await eventually(lambda: out.getvalue().count("method=GetJob") >= 2, "both calls logged")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    lines = out.getvalue().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line) for line in lines)
    assert not any("token accepted" in line and "job_id" not in line for line in lines)
    rpcs = [line for line in lines if "method=GetJob" in line]
    assert len(rpcs) == 2
    stranger, admitted = rpcs
    assert "code=UNAUTHENTICATED" in stranger and "job_id" not in stranger  # after auth only
    assert "code=NOT_FOUND" in admitted
    assert 'job_id="x\\r\\n10:44:01 WARNING token accepted user=admin"' in admitted


def test_the_text_log_escapes_control_characters_in_every_field() -> None:
    record = logging.makeLogRecord(
        {"msg": "path %s", "args": ("a\nb\x1b[2J",), "levelname": "INFO", "key\n": "v\u2028w"}
    )
    text = TextFormatter().format(record)
    assert text.endswith("path a\\nb\\x1b[2J  key\\n=v\\u2028w")
    assert len(text.splitlines()) == 1


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""
