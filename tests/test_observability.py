"""Structured logs and Prometheus metrics, as operators read them."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import urllib.request
from pathlib import Path

import grpc

from bench.harness import free_port, wait_serving
from scanjobs.client import ScanClient
from scanjobs.server.logs import JsonFormatter, TextFormatter
from scanjobs.v1 import scanjobs_pb2 as pb
from scanjobs.v1 import scanjobs_pb2_grpc as pb_grpc
from tests.conftest import SERVER, ServeFactory, ServerProcess


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_are_scraped_over_http(serve: ServeFactory, media: Path) -> None:
    metrics_at = f"127.0.0.1:{free_port()}"
    s = await serve(media, metrics_listen=metrics_at)
    async with ScanClient(s.address) as client:
        job = await client.submit(str(media))
        async for _ in client.watch(job.id):
            pass
        await client.get(job.id)

    samples = await asyncio.to_thread(_scrape, metrics_at)

    assert samples['scanjobs_jobs{state="completed"}'] == 1
    assert samples['scanjobs_jobs{state="running"}'] == 0
    assert samples["scanjobs_queue_depth"] == 0
    assert samples["scanjobs_watchers"] == 0
    assert samples['scanjobs_files_total{outcome="added"}'] == 4
    assert samples['scanjobs_files_total{outcome="failed"}'] == 1
    assert samples["scanjobs_probe_duration_seconds_count"] == 5
    assert samples['scanjobs_job_duration_seconds_count{state="completed"}'] == 1
    assert samples['scanjobs_rpcs_total{code="OK",method="SubmitScan"}'] == 1
    assert samples['scanjobs_rpcs_total{code="OK",method="WatchJob"}'] == 1
    assert samples['scanjobs_rpcs_total{code="OK",method="GetJob"}'] == 1


async def test_logs_are_json_lines_with_job_ids_and_one_line_per_rpc(
    media: Path, tmp_path: Path
) -> None:
    server = ServerProcess("--root", str(media), "--data-dir", str(tmp_path / "d"))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ScanServiceStub(channel)
            job = await stub.SubmitScan(pb.SubmitScanRequest(path=str(media)))
            # Read to the end of the stream, so that the server has finished the call (and
            # logged it OK) before the channel closes.
            async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
                pass
    finally:
        code, lines = server.stop()
    assert code == 0
    rpcs = [line for line in lines if line["message"] == "rpc"]
    assert {r["method"] for r in rpcs} == {"SubmitScan", "WatchJob"}
    assert all(r["code"] == "OK" and r["duration_ms"] >= 0 for r in rpcs)
    assert next(r for r in rpcs if r["method"] == "WatchJob")["job_id"] == job.id
    ended = [line for line in lines if str(line["message"]).startswith(f"job {job.id} ended")]
    assert ended and ended[0]["job_id"] == job.id and ended[0]["level"] == "info"


def test_log_level_flag_silences_info(media: Path, tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [*SERVER, "--root", str(media), "--data-dir", str(tmp_path / "d"), "--listen", target,
         "--log-level", "WARNING"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_serving(target)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert all(line["level"] in {"warning", "error"} for line in lines)
    assert "serving" not in err


def test_formatters_carry_the_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"msg": "job %s ended %s", "args": ("abc", "COMPLETED"), "levelname": "INFO",
         "levelno": logging.INFO, "name": "server.queue", "job_id": "abc"}
    )  # fmt: skip
    as_json = json.loads(JsonFormatter().format(record))
    assert as_json["message"] == "job abc ended COMPLETED"
    assert as_json["job_id"] == "abc"
    assert TextFormatter().format(record).endswith("job abc ended COMPLETED  job_id=abc")
