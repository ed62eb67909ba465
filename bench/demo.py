"""``make demo``: a scan end to end on a generated library, with a real server and the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.corpus import make_corpus

LIBRARY = Path(".data/demo-media")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(root: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    target = f"127.0.0.1:{_free_port()}"
    with (data_dir / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "--root", str(root.resolve()),
             "--data-dir", str(data_dir), "--listen", target],
            stderr=log,
        )  # fmt: skip
    for _ in range(100):  # until the health service answers
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return server, target
            except grpc.RpcError:
                time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start; see {data_dir / 'server.log'}")


def main() -> int:
    """Generate a library, serve it, scan it with the CLI, list what was found."""
    print(f"generating a library of 600 small videos in {LIBRARY} ...")
    make_corpus(LIBRARY, 600, per_folder=60)
    with tempfile.TemporaryDirectory(prefix="scanjobs-demo-") as data_dir:
        server, target = _start_server(LIBRARY, Path(data_dir))
        try:
            cli = [sys.executable, "-m", "client", "--target", target]
            for args in (["scan", str(LIBRARY)], ["videos", "--limit", "8"], ["jobs"]):
                print(f"\n$ scanjobs {' '.join(args)}", flush=True)
                subprocess.run([*cli, *args], check=False)
        finally:
            server.terminate()
            server.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
