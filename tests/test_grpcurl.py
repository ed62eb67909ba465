"""The grpcurl examples of docs/api.md, run as written against a real server.

Only reflection is used: grpcurl gets no .proto file. The examples' placeholders
(127.0.0.1:50051, /srv/media, JOB_ID) are replaced with this test's server, library and jobs.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ServeFactory
from tests.media import write_video

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def examples() -> dict[str, str]:
    """``# example: NAME`` blocks of the doc, by name."""
    found = re.findall(r"```sh\n# example: ([\w-]+)\n(grpcurl [^\n]+)\n```", DOC.read_text())
    return dict(found)


def _objects(text: str) -> list[Any]:
    decoder, objects, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
    return objects


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


class Doc:
    def __init__(self, address: str, library: Path) -> None:
        self.address, self.library = address, library
        self.commands = examples()

    async def run(self, name: str, job_id: str = "") -> tuple[int, str, str]:
        command = (
            self.commands[name]
            .replace("127.0.0.1:50051", self.address)
            .replace("/srv/media", str(self.library))
            .replace("JOB_ID", job_id)
        )
        argv = shlex.split(command)
        assert GRPCURL is not None
        proc = await asyncio.create_subprocess_exec(
            GRPCURL, *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def json(self, name: str, job_id: str = "") -> list[Any]:
        code, out, err = await self.run(name, job_id)
        assert code == 0, err
        return _objects(out)


def test_the_doc_has_every_example() -> None:
    assert set(examples()) == {
        "submit", "watch", "cancel", "get", "list-jobs", "list-videos", "error", "health",
        "list", "describe", "reprobe", "list-missing", "list-file-errors", "watch-videos",
        "list-roots",
    }  # fmt: skip


async def test_grpcurl_drives_the_server_through_reflection_alone(
    serve: ServeFactory, tmp_path: Path
) -> None:
    library = tmp_path / "media"
    library.mkdir()
    write_video(library / "a.mp4")
    write_video(library / "b.mkv", container="matroska", subtitles=True)
    (library / "gate.mp4").write_bytes((library / "a.mp4").read_bytes())
    s = await serve(library, misbehaving=True)
    doc = Doc(s.address, library)

    code, listed, _ = await doc.run("list")
    assert code == 0
    assert set(listed.split()) == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "scanjobs.v1.ScanService",
    }
    code, described, _ = await doc.run("describe")
    assert (
        "rpc WatchJob ( .scanjobs.v1.WatchJobRequest ) returns ( stream .scanjobs.v1.JobEvent );"
        in described
    )
    assert (await doc.json("health"))[0] == {"status": "SERVING"}

    # A job held by the gated file: cancel it while it runs, and watch it end CANCELLED.
    (held,) = await doc.json("submit")
    assert held["state"] == "JOB_STATE_PENDING"
    while (await doc.json("get", held["id"]))[0]["state"] != "JOB_STATE_RUNNING":
        await asyncio.sleep(0.02)
    (cancelled,) = await doc.json("cancel", held["id"])
    assert cancelled["cancel_requested"] is True
    events = await doc.json("watch", held["id"])
    assert events[-1]["job"]["state"] == "JOB_STATE_CANCELLED"

    # The gate open, a job runs to the end; its events stream to the terminal one.
    (library / "open-gate").touch()
    (job,) = await doc.json("submit")
    events = await doc.json("watch", job["id"])
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == sorted(set(sequences))
    final = events[-1]["job"]
    assert final["state"] == "JOB_STATE_COMPLETED"
    assert final["result"]["scanned"] == "3"
    assert (await doc.json("get", job["id"]))[0]["state"] == "JOB_STATE_COMPLETED"
    (jobs,) = await doc.json("list-jobs")
    assert [j["id"] for j in jobs["jobs"]] == [job["id"]]
    (page,) = await doc.json("list-videos")
    assert [Path(v["path"]).name for v in page["videos"]] == ["a.mp4", "b.mkv"]
    assert page["videos"][1]["subtitle_streams"] == 1
    assert page["next_page_token"]

    code, _, err = await doc.run("error")
    assert code != 0
    assert "Code: PermissionDenied" in err
    assert '"reason":"PATH_OUTSIDE_ROOTS"' in err


async def test_grpcurl_shows_missing_videos_file_errors_and_reprobes(
    serve: ServeFactory, tmp_path: Path
) -> None:
    library = tmp_path / "media"
    library.mkdir()
    write_video(library / "a.mp4")
    write_video(library / "b.mp4")
    (library / "broken.mp4").write_bytes(b"not a video" * 10)
    s = await serve(library)
    doc = Doc(s.address, library)
    (first,) = await doc.json("submit")
    await doc.json("watch", first["id"])
    (library / "b.mp4").unlink()
    (second,) = await doc.json("submit")
    rescan = (await doc.json("watch", second["id"]))[-1]["job"]["result"]

    (with_missing,) = await doc.json("list-missing")
    (errors,) = await doc.json("list-file-errors")
    (again,) = await doc.json("reprobe")
    reprobed = (await doc.json("watch", again["id"]))[-1]["job"]

    assert (rescan["unchanged"], rescan["failed"], rescan["removed"]) == ("1", "1", "1")
    videos = {Path(v["path"]).name: v for v in with_missing["videos"]}
    assert sorted(videos) == ["a.mp4", "b.mp4"]
    assert "missing_time" in videos["b.mp4"] and "missing_time" not in videos["a.mp4"]
    (error,) = errors["file_errors"]
    assert (Path(error["path"]).name, error["size_bytes"]) == ("broken.mp4", "110")
    assert error["job_id"] == first["id"] and error["message"].startswith("not a readable")
    assert again["reprobe"] is True
    assert (reprobed["result"]["updated"], reprobed["result"]["failed"]) == ("1", "1")


async def test_grpcurl_follows_the_catalog_changes(serve: ServeFactory, tmp_path: Path) -> None:
    library = tmp_path / "media"
    library.mkdir()
    write_video(library / "a.mp4")
    s = await serve(library)
    doc = Doc(s.address, library)
    (job,) = await doc.json("submit")
    events = await doc.json("watch", job["id"])
    assert events[-1]["job"]["state"] == "JOB_STATE_COMPLETED"
    (page,) = await doc.json("list-videos")
    code, out, err = await doc.run("watch-videos")  # ended by its -max-time
    assert code != 0 and "DeadlineExceeded" in err, err
    (change,) = _objects(out)
    assert change["kind"] == "VIDEO_EVENT_KIND_ADDED"
    assert change["video"]["path"] == str(library / "a.mp4")
    assert change["sequence"] == page["catalog_sequence"] == "1"
    ((root,),) = [r["roots"] for r in await doc.json("list-roots")]
    assert root == {
        "path": str(library),
        "watch_mode": "WATCH_MODE_OFF",
        "reason": "the server runs without --watch",
        "video_count": "1",
    }
