"""A Node.js client (@grpc/grpc-js, stubs loaded from protos/) against a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ServeFactory
from tests.media import write_video

HERE = Path(__file__).resolve().parent / "interop" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")


async def _run(*argv: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed here")
@pytest.mark.timeout(300)
async def test_node_client_submits_watches_cancels_and_sees_error_codes(
    serve: ServeFactory, tmp_path: Path
) -> None:
    assert NODE is not None and NPM is not None
    if not (HERE / "node_modules" / "@grpc" / "grpc-js").exists():
        code, _, err = await _run(NPM, "ci", "--no-audit", "--no-fund", cwd=HERE)
        assert code == 0, err
    root = tmp_path / "lib"
    (root / "films").mkdir(parents=True)
    (root / "held").mkdir()
    write_video(root / "films" / "a.mp4")
    write_video(root / "films" / "b.mkv", container="matroska")
    (root / "held" / "gate.mp4").write_bytes(b"x")  # blocks in the probe: cancelled mid-file
    s = await serve(root, misbehaving=True)

    code, out, err = await _run(
        NODE, "client.js", s.address, str(root / "films"), str(root / "held"), cwd=HERE
    )

    assert code == 0, err
    seen = json.loads(out)
    assert seen["completed"]["state"] == "JOB_STATE_COMPLETED"
    assert seen["completed"]["added"] == 2
    assert seen["cancelled"] == {
        "reply_cancel_requested": True,
        "final_state": "JOB_STATE_CANCELLED",
    }
    assert seen["error"]["name"] == "PERMISSION_DENIED"
    assert seen["error"]["details"] == "/etc is outside the allowed roots"
    assert seen["error"]["has_status_details"] is True
