"""Prometheus metrics, served on ``--metrics-listen`` (off by default).

The domain core knows nothing of Prometheus: the queue and the probe pool call plain
callbacks (``on_event``, ``on_probe``), and gauges are read from the queue when scraped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .jobs import JobEvent, JobState
from .library_watch import RootState, WatchMode

__all__ = ["Metrics"]

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
_PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30)


class _Gauges(Collector):
    """Gauges read at scrape time: jobs by state, queue depth, open watch streams."""

    def __init__(self, read: Callable[[], tuple[dict[JobState, int], int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        by_state, pending, watchers = self._read()
        jobs = GaugeMetricFamily(
            "scanjobs_jobs", "Jobs kept by the server, by state", labels=["state"]
        )
        for state in JobState:
            jobs.add_metric([state.value.lower()], by_state.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("scanjobs_queue_depth", "Jobs waiting for a worker", value=pending)
        yield GaugeMetricFamily("scanjobs_watchers", "Open WatchJob streams", value=watchers)


class Metrics:
    """The server's metrics in their own registry (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._durations = Histogram(
            "scanjobs_job_duration_seconds", "Run time of ended jobs, start to end",
            ["state"], buckets=_DURATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._files = Counter(
            "scanjobs_files_total", "Files handled by ended jobs, by outcome",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self._probes = Histogram(
            "scanjobs_probe_duration_seconds", "Time to probe one file in a worker",
            buckets=_PROBE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._root_modes = Gauge(
            "scanjobs_root_watch_mode", "1 for the way each root is watched (--watch)",
            ["root", "mode"], registry=self.registry,
        )  # fmt: skip
        self._rpcs = Counter(
            "scanjobs_rpcs_total", "ScanService calls by method and status code",
            ["method", "code"], registry=self.registry,
        )  # fmt: skip
        self._abandoned = Counter(
            "scanjobs_abandoned_processes_total",
            "Killed worker processes that did not exit (stuck in the kernel on a dead share)",
            registry=self.registry,
        )
        self._stuck_calls = Gauge(
            "scanjobs_stuck_fs_calls",
            "Filesystem calls of the server past their deadline (--io-timeout), not back yet",
            registry=self.registry,
        )

    def watch_queue(self, read: Callable[[], tuple[dict[JobState, int], int, int]]) -> None:
        """Report the gauges that ``read`` returns: (jobs by state, pending, watchers)."""
        self.registry.register(_Gauges(read))

    def on_event(self, event: JobEvent) -> None:
        """Count a job's figures when it ends."""
        job = event.job
        if not job.terminal:
            return
        if job.start_time is not None and job.end_time is not None:
            elapsed = (job.end_time - job.start_time).total_seconds()
            self._durations.labels(job.state.value.lower()).observe(elapsed)
        result = job.result
        for outcome, count in (
            ("added", result.added), ("updated", result.updated),
            ("unchanged", result.unchanged), ("failed", result.failed),
            ("moved", result.moved), ("restored", result.restored),
            ("removed", result.removed),
        ):  # fmt: skip
            if count:
                self._files.labels(outcome).inc(count)

    def on_probe(self, seconds: float) -> None:
        """One file probed."""
        self._probes.observe(seconds)

    def on_root_state(self, state: RootState) -> None:
        """A root's watch mode changed (or its last reconcile time)."""
        for mode in WatchMode:
            self._root_modes.labels(state.path, mode.value).set(int(mode is state.mode))

    def on_abandoned_process(self) -> None:
        """A killed worker process did not exit and was left behind."""
        self._abandoned.inc()

    def watch_stuck_calls(self, read: Callable[[], int]) -> None:
        """Report ``read()`` as the filesystem calls stuck past their deadline."""
        self._stuck_calls.set_function(read)

    def on_rpc(self, method: str, code: str) -> None:
        """One ScanService call ended."""
        self._rpcs.labels(method, code).inc()

    def serve(
        self,
        listen: str,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
    ) -> None:
        """Expose ``/metrics`` on ``host:port`` (a daemon thread): HTTPS with ``tls_cert`` and
        ``tls_key``, and then only to clients with a certificate from ``tls_client_ca``."""
        host, _, port = listen.rpartition(":")
        self._http = start_http_server(
            int(port),
            addr=host.strip("[]") or "127.0.0.1",
            registry=self.registry,
            certfile=str(tls_cert) if tls_cert else None,
            keyfile=str(tls_key) if tls_key else None,
            client_cafile=str(tls_client_ca) if tls_client_ca else None,
            client_auth_required=tls_client_ca is not None,
        )

    def close(self) -> None:
        """Stop serving ``/metrics`` and close its socket; idempotent."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join()
