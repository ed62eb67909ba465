"""The HTTP port (--http-listen): REST, Connect and gRPC-Web against a real server.

REST and raw Connect go through httpx, so that the wire form is what is checked; the streaming
and gRPC-Web calls go through the generated Connect client, a real client of those protocols.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.rpc import error_details_pb2

from scanjobs.server.app import ListenError
from scanjobs.server.config import parse_args
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1.scanjobs_connect import ScanServiceClient
from tests.certs import Authority
from tests.conftest import Running, ServeFactory, gated_library, until_running, wait_terminal

TOKEN = "s3cret-token-for-tests"
OTHER_ORIGIN = "http://elsewhere.example"


async def _http(serve: ServeFactory, root: Path, **overrides: Any) -> tuple[Running, str]:
    running = await serve(root, http_listen="127.0.0.1:0", **overrides)
    return running, f"http://127.0.0.1:{running.app.http_port}"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as http:
        yield http


def _error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"code", "message", "reason"}
    return response.status_code, body["code"], body["reason"]


# -- REST ------------------------------------------------------------------------------------


async def test_rest_submit_answers_201_with_the_job_in_the_proto_json_mapping(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    s, base = await _http(serve, media)
    response = await client.post(f"{base}/api/v1/scans", json={"path": str(media)})

    assert response.status_code == 201
    job = response.json()
    assert job["path"] == str(media) and job["state"].startswith("JOB_STATE_")
    assert response.headers["location"] == f"/api/v1/jobs/{job['id']}"
    final = await wait_terminal(s.stub, job["id"])  # the same job on the gRPC port
    got = await client.get(f"{base}/api/v1/jobs/{job['id']}")
    assert got.status_code == 200
    assert got.json()["state"] == "JOB_STATE_COMPLETED" == pb.JobState.Name(final.state)
    assert got.json()["result"]["added"] == str(final.result.added) == "4"  # 64-bit: a string


async def test_rest_get_of_an_unknown_job_is_404(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)
    response = await client.get(f"{base}/api/v1/jobs/no-such-job")
    assert _error(response) == (404, "not_found", "JOB_NOT_FOUND")


async def test_rest_cancel_answers_the_job_and_the_same_again_once_cancelled(
    serve: ServeFactory, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    root = gated_library(tmp_path / "lib")
    s, base = await _http(serve, root, misbehaving=True)
    job = (await client.post(f"{base}/api/v1/scans", json={"path": str(root)})).json()
    await until_running(s.stub, job["id"])

    first = await client.post(f"{base}/api/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["cancelRequested"] is True
    final = await wait_terminal(s.stub, job["id"])
    assert final.state == pb.JOB_STATE_CANCELLED
    again = await client.post(f"{base}/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 200
    assert again.json()["state"] == "JOB_STATE_CANCELLED"
    assert again.json() == (await client.post(f"{base}/api/v1/jobs/{job['id']}/cancel")).json()


async def test_rest_cancel_of_an_unknown_job_is_404_and_of_a_finished_one_409(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    s, base = await _http(serve, media)
    unknown = await client.post(f"{base}/api/v1/jobs/nope/cancel")
    assert _error(unknown) == (404, "not_found", "JOB_NOT_FOUND")
    job = (await client.post(f"{base}/api/v1/scans", json={"path": str(media)})).json()
    await wait_terminal(s.stub, job["id"])
    ended = await client.post(f"{base}/api/v1/jobs/{job['id']}/cancel")
    assert _error(ended) == (409, "failed_precondition", "JOB_ALREADY_ENDED")


async def test_rest_maps_every_bad_scan_request_to_its_status_and_reason(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)

    async def submit(body: object) -> tuple[int, str, str]:
        return _error(await client.post(f"{base}/api/v1/scans", json=body))

    assert await submit({"path": "relative/dir"}) == (400, "invalid_argument", "PATH_NOT_ABSOLUTE")
    assert await submit({}) == (400, "invalid_argument", "PATH_REQUIRED")
    assert await submit({"path": "/etc"}) == (403, "permission_denied", "PATH_OUTSIDE_ROOTS")
    assert await submit({"path": f"{media}/gone"}) == (404, "not_found", "PATH_NOT_FOUND")
    file = f"{media}/a.mp4"
    assert await submit({"path": file}) == (409, "failed_precondition", "NOT_A_DIRECTORY")
    assert await submit({"path": str(media), "bogus": 1}) == (
        400,
        "invalid_argument",
        "MALFORMED_REQUEST",
    )
    assert await submit(["not", "an", "object"]) == (400, "invalid_argument", "MALFORMED_REQUEST")
    long_id = f"{base}/api/v1/jobs/{'x' * 65}"
    assert _error(await client.get(long_id)) == (400, "invalid_argument", "INVALID_ARGUMENT")


async def test_rest_answers_429_when_the_queue_is_full_and_503_while_shutting_down(
    serve: ServeFactory, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    root = gated_library(tmp_path / "lib")
    s, base = await _http(serve, root, misbehaving=True, workers=1, max_pending=1)
    running = (await client.post(f"{base}/api/v1/scans", json={"path": str(root)})).json()
    await until_running(s.stub, running["id"])
    pending = await client.post(f"{base}/api/v1/scans", json={"path": str(root)})
    assert pending.status_code == 201
    full = await client.post(f"{base}/api/v1/scans", json={"path": str(root)})
    assert _error(full)[:2] == (429, "resource_exhausted")

    (root / "open-gate").touch()
    await s.app.queue.close(2.0)  # what a SIGTERM does first: new work is refused
    closing = await client.post(f"{base}/api/v1/scans", json={"path": str(root)})
    assert _error(closing) == (503, "unavailable", "SHUTTING_DOWN")


async def test_rest_refuses_oversized_bodies_other_content_types_and_other_methods(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media, max_message_bytes=1024)
    big = await client.post(f"{base}/api/v1/scans", json={"path": "/" + "a" * 2000})
    assert _error(big) == (413, "resource_exhausted", "MESSAGE_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it comes
        for _ in range(64):
            yield b" " * 64

    streamed = await client.post(
        f"{base}/api/v1/scans", content=chunks(), headers={"content-type": "application/json"}
    )
    assert _error(streamed) == (413, "resource_exhausted", "MESSAGE_TOO_LARGE")
    form = await client.post(f"{base}/api/v1/scans", data={"path": str(media)})
    assert _error(form) == (415, "invalid_argument", "UNSUPPORTED_MEDIA_TYPE")
    wrong = await client.get(f"{base}/api/v1/scans")
    assert _error(wrong)[0] == 405


# -- authentication and CORS -------------------------------------------------------------------


async def test_a_token_protected_http_port_refuses_calls_without_the_token(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media, tokens=frozenset({TOKEN}))
    scans = f"{base}/api/v1/scans"
    body = {"path": str(media)}

    assert _error(await client.post(scans, json=body)) == (
        401,
        "unauthenticated",
        "UNAUTHENTICATED",
    )
    wrong = await client.post(scans, json=body, headers={"authorization": "Bearer guess"})
    assert wrong.status_code == 401
    in_url = await client.post(f"{scans}?token={TOKEN}&access_token={TOKEN}", json=body)
    assert in_url.status_code == 401  # a secret in a URL is never accepted
    connect = await client.post(
        f"{base}/scanjobs.v1.ScanService/ListJobs",
        json={},
        headers={"connect-protocol-version": "1"},
    )
    assert connect.status_code == 401 and connect.json()["code"] == "unauthenticated"
    good = await client.post(scans, json=body, headers={"authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 201
    page = await client.get(f"{base}/")  # the page itself is public: it asks for the token
    assert page.status_code == 200


async def test_cross_origin_calls_are_refused_unless_the_origin_is_listed(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    listed = "http://gui.example:3000"
    _, base = await _http(serve, media, http_cors_origins=(listed,))
    url = f"{base}/scanjobs.v1.ScanService/ListJobs"
    preflight = {"access-control-request-method": "POST"}

    refused = await client.options(url, headers={"origin": OTHER_ORIGIN, **preflight})
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    posted = await client.post(url, json={}, headers={"origin": OTHER_ORIGIN})
    assert _error(posted) == (403, "permission_denied", "ORIGIN_NOT_ALLOWED")

    allowed = await client.options(url, headers={"origin": listed, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == listed
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    called = await client.post(url, json={}, headers={"origin": listed})
    assert called.status_code == 200 and called.headers["access-control-allow-origin"] == listed
    same = await client.post(url, json={}, headers={"origin": base})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


async def test_cors_is_off_by_default(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)
    response = await client.options(
        f"{base}/api/v1/scans",
        headers={"origin": "http://localhost:5173", "access-control-request-method": "POST"},
    )
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers


# -- Connect and gRPC-Web ----------------------------------------------------------------------


async def test_connect_unary_json_and_its_errors_carry_the_reason(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)
    url = f"{base}/scanjobs.v1.ScanService"
    submitted = await client.post(f"{url}/SubmitScan", json={"path": str(media)})
    assert submitted.status_code == 200 and submitted.json()["path"] == str(media)

    missing = await client.post(f"{url}/GetJob", json={"jobId": "nope"})
    assert missing.status_code == 404
    error = missing.json()
    assert error["code"] == "not_found" and error["details"][0]["type"] == "google.rpc.ErrorInfo"
    info = error_details_pb2.ErrorInfo.FromString(_unpadded_b64(error["details"][0]["value"]))
    assert (info.reason, info.domain) == ("JOB_NOT_FOUND", "scanjobs")
    outside = await client.post(f"{url}/SubmitScan", json={"path": "/etc"})
    assert outside.status_code == 403 and outside.json()["code"] == "permission_denied"


async def test_native_grpc_on_the_http_port_is_pointed_to_the_grpc_port(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)
    response = await client.post(
        f"{base}/scanjobs.v1.ScanService/ListJobs",
        content=b"\x00\x00\x00\x00\x00",
        headers={"content-type": "application/grpc"},
    )
    assert _error(response) == (415, "unimplemented", "UNSUPPORTED_MEDIA_TYPE")
    assert "--listen" in response.json()["message"]


async def test_a_taken_http_port_fails_start_up_before_anything_runs(
    serve: ServeFactory, media: Path
) -> None:
    first, _ = await _http(serve, media)
    with pytest.raises(ListenError, match=r"cannot listen on 127\.0\.0\.1"):
        await serve(media, http_listen=f"127.0.0.1:{first.app.http_port}")


async def test_connect_refuses_a_message_over_the_size_limit(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media, max_message_bytes=1024)
    response = await client.post(
        f"{base}/scanjobs.v1.ScanService/SubmitScan", json={"path": "/" + "a" * 4000}
    )
    assert response.status_code == 429 and response.json()["code"] == "resource_exhausted"


async def test_connect_server_stream_of_watch_job_runs_to_the_terminal_event(
    serve: ServeFactory, media: Path
) -> None:
    gated_library(media)  # the scan holds until the watch has its first event
    _, base = await _http(serve, media, misbehaving=True)
    async with ScanServiceClient(base) as connect:
        job = await connect.submit_scan(pb.SubmitScanRequest(path=str(media)))
        stream = aiter(connect.watch_job(pb.WatchJobRequest(job_id=job.id)))
        events = [await anext(stream)]
        (media / "open-gate").touch()
        events += [e async for e in stream]

    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)) and len(events) >= 2
    assert events[0].job.state != pb.JOB_STATE_COMPLETED
    assert events[-1].job.state == pb.JOB_STATE_COMPLETED
    assert events[-1].job.result.added == 4


async def test_connect_json_stream_is_enveloped_and_ends_with_an_end_of_stream_message(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    s, base = await _http(serve, media)
    job = await s.stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
    await wait_terminal(s.stub, job.id)
    body = json.dumps({"jobId": job.id}).encode()
    response = await client.post(
        f"{base}/scanjobs.v1.ScanService/WatchJob",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={"content-type": "application/connect+json"},
    )
    frames = _frames(response.content)
    assert [flags for flags, _ in frames] == [0, 2]  # the terminal snapshot, then the end
    assert json.loads(frames[0][1])["job"]["state"] == "JOB_STATE_COMPLETED"
    assert json.loads(frames[1][1]) == {}


async def test_grpc_web_calls_reach_the_same_jobs_and_map_errors(
    serve: ServeFactory, media: Path
) -> None:
    s, base = await _http(serve, media)
    async with ScanServiceClient(base, protocol=ProtocolType.GRPC_WEB) as web:
        job = await web.submit_scan(pb.SubmitScanRequest(path=str(media)))
        events = [e async for e in web.watch_job(pb.WatchJobRequest(job_id=job.id))]
        with pytest.raises(ConnectError) as missing:
            await web.cancel_job(pb.CancelJobRequest(job_id="nope"))
        listed = await web.list_videos(pb.ListVideosRequest(job_id=job.id))

    assert events[-1].job.state == pb.JOB_STATE_COMPLETED
    assert (await s.stub.GetJob(pb.GetJobRequest(job_id=job.id))).state == pb.JOB_STATE_COMPLETED
    assert missing.value.code is Code.NOT_FOUND
    assert len(listed.videos) == 4


async def test_connect_lists_missing_videos_and_file_errors_like_grpc(
    serve: ServeFactory, media: Path
) -> None:
    s, base = await _http(serve, media)
    async with ScanServiceClient(base) as connect:
        first = await connect.submit_scan(pb.SubmitScanRequest(path=str(media)))
        await wait_terminal(s.stub, first.id)
        (media / "a.mp4").unlink()
        again = await connect.submit_scan(pb.SubmitScanRequest(path=str(media), reprobe=True))
        final = await wait_terminal(s.stub, again.id)
        shown = await connect.list_videos(pb.ListVideosRequest(include_missing=True))
        hidden = await connect.list_videos(pb.ListVideosRequest())
        broken = await connect.list_file_errors(pb.ListFileErrorsRequest(path_prefix=str(media)))
        outside = await connect.list_file_errors(pb.ListFileErrorsRequest(path_prefix="/etc"))

    assert (final.reprobe, final.result.updated, final.result.removed) == (True, 3, 1)
    missing = [v.path for v in shown.videos if v.HasField("missing_time")]
    assert missing == [str(media / "a.mp4")] and len(hidden.videos) == 3
    assert [e.path for e in broken.file_errors] == [str(media / "garbage.mp4")]
    assert list(outside.file_errors) == []


async def test_a_connect_watcher_that_hangs_up_is_forgotten(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = gated_library(tmp_path / "lib")
    s, base = await _http(serve, root, misbehaving=True)
    async with ScanServiceClient(base) as connect:
        job = await connect.submit_scan(pb.SubmitScanRequest(path=str(root)))
        stream = connect.watch_job(pb.WatchJobRequest(job_id=job.id))
        await anext(aiter(stream))
        assert s.app.queue.stats()[2] == 1
        await stream.aclose()  # type: ignore[attr-defined]
    async with asyncio.timeout(10):  # the server learns of the hang-up from the socket
        while s.app.queue.stats()[2]:
            await asyncio.sleep(0.01)
    (root / "open-gate").touch()


async def test_connect_and_grpc_watch_videos_streams_share_the_max_watchers_limit(
    serve: ServeFactory, tmp_path: Path
) -> None:
    s, base = await _http(serve, tmp_path, max_watchers=1)
    held = s.stub.WatchVideos(pb.WatchVideosRequest())
    await held.wait_for_connection()  # the one slot is the gRPC stream's
    async with ScanServiceClient(base) as connect:
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(60):
                await anext(aiter(connect.watch_videos(pb.WatchVideosRequest())))
        held.cancel()
        async with asyncio.timeout(10):  # the server learns of the cancel from the stream
            while s.app.service.video_watchers:
                await asyncio.sleep(0.01)
        stream = connect.watch_videos(pb.WatchVideosRequest())
        first = asyncio.create_task(anext(aiter(stream)))
        async with asyncio.timeout(10):  # now the slot is the Connect stream's
            while not s.app.service.video_watchers:
                await asyncio.sleep(0.01)
        again = s.stub.WatchVideos(pb.WatchVideosRequest())
        with pytest.raises(grpc.aio.AioRpcError) as crowded:
            async with asyncio.timeout(60):
                await again.read()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    assert refused.value.code is Code.RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo.FromString(refused.value.details[0].message_bytes)
    assert info.reason == "TOO_MANY_WATCHERS"
    assert crowded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_stop_ends_open_http_streams_with_unavailable(
    serve: ServeFactory, tmp_path: Path
) -> None:
    root = gated_library(tmp_path / "lib")
    s, base = await _http(serve, root, misbehaving=True)
    async with ScanServiceClient(base) as connect:
        job = await connect.submit_scan(pb.SubmitScanRequest(path=str(root)))
        stream = aiter(connect.watch_job(pb.WatchJobRequest(job_id=job.id)))
        await anext(stream)
        stopping = asyncio.create_task(s.app.stop())
        with pytest.raises(ConnectError) as ended:
            async for _ in stream:
                pass
        await stopping
    assert ended.value.code is Code.UNAVAILABLE


# -- the page, TLS and flags -------------------------------------------------------------------


async def test_the_page_is_served_at_the_root_with_a_same_origin_policy(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient
) -> None:
    _, base = await _http(serve, media)
    page = await client.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    head = await client.head(f"{base}/app.js")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/javascript")
    assert int(head.headers["content-length"]) == len((await client.get(f"{base}/app.js")).content)
    assert _error(await client.get(f"{base}/no/such/file"))[0] == 404


async def test_the_http_port_serves_tls_with_the_grpc_ports_certificate(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    ca = Authority(tmp_path / "pki", "ca")
    pair = ca.issue("server", server=True)
    s = await serve(media, http_listen="127.0.0.1:0", tls_cert=pair.cert, tls_key=pair.key)
    url = f"https://127.0.0.1:{s.app.http_port}/api/v1/jobs/nope"
    trust = ssl.create_default_context(cafile=ca.pair.cert)
    async with httpx.AsyncClient(verify=trust) as tls:
        assert (await tls.get(url)).status_code == 404
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(url.replace("https", "http"))


async def test_the_http_port_requires_a_client_certificate_with_mutual_tls(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    ca = Authority(tmp_path / "pki", "ca")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    s = await serve(
        media,
        http_listen="127.0.0.1:0",
        tls_cert=server.cert,
        tls_key=server.key,
        tls_client_ca=ca.pair.cert,
    )
    url = f"https://127.0.0.1:{s.app.http_port}/api/v1/jobs/nope"
    anonymous = ssl.create_default_context(cafile=ca.pair.cert)
    with_cert = ssl.create_default_context(cafile=ca.pair.cert)
    with_cert.load_cert_chain(client.cert, client.key)
    async with httpx.AsyncClient(verify=with_cert) as good:
        assert (await good.get(url)).status_code == 404
    async with httpx.AsyncClient(verify=anonymous) as bad:
        with pytest.raises(httpx.HTTPError):
            await bad.get(url)


def test_http_flags_are_checked_like_the_grpc_ones(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_args(
        [
            "--root",
            "/m",
            "--http-listen",
            "127.0.0.1:8080",
            "--http-cors-origin",
            "http://a:1,https://b",
        ]
    )
    assert config.http_listen == "127.0.0.1:8080"
    assert config.http_cors_origins == ("http://a:1", "https://b")
    for bad in (["--http-listen", "0.0.0.0:8080"], ["--http-cors-origin", "http://a/path"]):
        with pytest.raises(SystemExit):
            parse_args(["--root", "/m", *bad])
    assert "refusing to listen on 0.0.0.0:8080" in capsys.readouterr().err


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        flags, size = struct.unpack(">BI", data[:5])
        frames.append((flags, data[5 : 5 + size]))
        data = data[5 + size :]
    return frames


def _unpadded_b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


async def test_every_http_call_is_one_log_line_without_the_token(
    serve: ServeFactory, media: Path, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    _, base = await _http(serve, media, tokens=frozenset({TOKEN}))
    auth = {"authorization": f"Bearer {TOKEN}"}
    caplog.set_level("INFO", logger="scanjobs.server.connect")
    await client.get(f"{base}/api/v1/jobs/nope", headers=auth)
    await client.post(f"{base}/scanjobs.v1.ScanService/ListJobs", json={}, headers=auth)

    lines = [r.__dict__ for r in caplog.records if r.getMessage() == "rpc"]
    assert [(x["method"], x["code"], x["transport"]) for x in lines] == [
        ("GetJob", "NOT_FOUND", "http"),
        ("ListJobs", "OK", "http"),
    ]
    assert lines[0]["job_id"] == "nope"
    assert TOKEN not in caplog.text + "".join(str(r.__dict__) for r in caplog.records)


# -- the curl examples of docs/api.md ----------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _curl_examples() -> dict[str, list[str]]:
    found = re.findall(r"```sh\n# http-example: ([\w-]+)\n(curl [^\n]+)\n```", DOC.read_text())
    return {name: shlex.split(line) for name, line in found}


async def _curl(argv: list[str], base: str, library: Path, job_id: str = "") -> tuple[int, Any]:
    argv = [
        a.replace("http://127.0.0.1:8080", base).replace("/srv/media", str(library)) for a in argv
    ]
    argv = [a.replace("JOB_ID", job_id) for a in argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, "-w", "\n%{http_code}", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body)


async def test_the_curl_examples_of_the_api_doc_work_as_written(
    serve: ServeFactory, media: Path
) -> None:
    examples = _curl_examples()
    assert set(examples) == {"submit", "get", "cancel", "connect-unary", "error"}
    s, base = await _http(serve, media)

    status, job = await _curl(examples["submit"], base, media)
    assert status == 201 and job["path"] == str(media)
    await wait_terminal(s.stub, job["id"])
    status, got = await _curl(examples["get"], base, media, job["id"])
    assert status == 200 and got["state"] == "JOB_STATE_COMPLETED"
    status, ended = await _curl(examples["cancel"], base, media, job["id"])
    assert status == 409 and ended["reason"] == "JOB_ALREADY_ENDED"
    status, listed = await _curl(examples["connect-unary"], base, media)
    assert status == 200 and [j["id"] for j in listed["jobs"]] == [job["id"]]
    status, error = await _curl(examples["error"], base, media)
    assert (status, error) == (
        403,
        {
            "code": "permission_denied",
            "message": "/etc is outside the allowed roots",
            "reason": "PATH_OUTSIDE_ROOTS",
        },
    )
    assert json.dumps(error) in DOC.read_text()
