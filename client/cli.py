"""``scanjobs``: the command line for a scanjobs server.

Exit codes: 0 the job COMPLETED (or the command succeeded), 1 an RPC or connection error,
2 a usage error, 3 the job FAILED, 4 it hit its TIMEOUT, 5 it was CANCELLED, 130 interrupted
by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scanjobs.v1 import scanjobs_pb2 as pb

from .api import ScanClient, TlsFiles
from .errors import InvalidRequest, ScanClientError
from .progress import JobDisplay, state_name

__all__ = ["main"]

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_INTERRUPTED = 130
_EXIT_BY_STATE = {
    pb.JOB_STATE_COMPLETED: EXIT_OK,
    pb.JOB_STATE_FAILED: EXIT_FAILED,
    pb.JOB_STATE_TIMEOUT: EXIT_TIMEOUT,
    pb.JOB_STATE_CANCELLED: EXIT_CANCELLED,
}
_TRIGGERS = {
    value: name.removeprefix("JOB_TRIGGER_").lower()
    for name, value in pb.JobTrigger.items()
    if value != pb.JOB_TRIGGER_UNSPECIFIED
}
_STATES = {
    name.removeprefix("JOB_STATE_").lower(): value
    for name, value in pb.JobState.items()
    if value != pb.JOB_STATE_UNSPECIFIED
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scanjobs", description="Scan media folders on a scanjobs server."
    )
    p.add_argument(
        "--target",
        default=os.environ.get("SCANJOBS_TARGET", "127.0.0.1:50051"),
        help="server address (default %(default)s; env SCANJOBS_TARGET)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("SCANJOBS_TOKEN"),
        help="bearer token (env SCANJOBS_TOKEN); prefer --token-file",
    )
    p.add_argument("--token-file", type=Path, help="file holding the bearer token")
    p.add_argument("--tls-ca", type=Path, help="PEM file of the CA that signed the server")
    p.add_argument("--tls-cert", type=Path, help="client certificate PEM (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key PEM (mutual TLS)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    p.add_argument(
        "--deadline",
        type=float,
        default=10.0,
        help="seconds each call may take (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="scan a folder and follow the job (Ctrl-C cancels it)")
    scan.add_argument("path", help="folder to scan, on the server's file system")
    scan.add_argument(
        "--no-recursive",
        dest="recursive",
        action="store_false",
        help="do not descend into subfolders",
    )
    scan.add_argument("--timeout", type=float, help="seconds the job may run")
    scan.add_argument("--request-id", default="", help="idempotency key for safe retries")
    scan.add_argument("--detach", action="store_true", help="print the job and return at once")
    scan.add_argument(
        "--reprobe",
        action="store_true",
        help="probe every file again, even unchanged ones (after an FFmpeg upgrade)",
    )

    for name, text in (
        ("watch", "follow a job until it ends"),
        ("cancel", "cancel a job"),
        ("get", "show a job"),
    ):
        sub.add_parser(name, help=text).add_argument("job_id")

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", choices=sorted(_STATES), help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")

    videos = sub.add_parser("videos", help="list the video catalog")
    videos.add_argument("--prefix", default="", help="only paths starting with this")
    videos.add_argument("--job", default="", help="only videos last probed by this job")
    videos.add_argument("--limit", type=int, default=None, help="at most this many")
    videos.add_argument(
        "--missing",
        action="store_true",
        help="only missing videos (found gone by a scan, kept for a while)",
    )

    follow = sub.add_parser(
        "follow", help="print the catalog's changes as they happen (Ctrl-C stops)"
    )
    follow.add_argument("prefix", nargs="?", default="", help="only paths starting with this")
    follow.add_argument(
        "--after", type=int, default=None, metavar="SEQUENCE",
        help="start after this change (the last one printed before) instead of now",
    )  # fmt: skip

    sub.add_parser("roots", help="show the roots and how each is watched")

    errors = sub.add_parser("errors", help="list files that could not be probed, and why")
    errors.add_argument("prefix", nargs="?", default="", help="only paths starting with this")
    errors.add_argument("--limit", type=int, default=None, help="at most this many")
    return p  # fmt: skip


def _client(args: argparse.Namespace) -> ScanClient:
    token = args.token
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    return ScanClient(args.target, token=token, tls=tls, timeout_s=args.deadline)


def _as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class _Out:
    """Where output goes: JSON lines, or text for people (rich on a terminal)."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.console = Console(highlight=False, soft_wrap=True)
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def emit(self, message: Any) -> None:
        print(json.dumps(_as_json(message)), flush=True)

    def error(self, text: str) -> None:
        self.errors.print(f"error: {escape(text)}")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table on a terminal; tab-separated lines (header first) for pipes and files."""
        if not self.console.is_terminal:
            for row in [headers, *rows]:
                print("\t".join(row))
            return
        table = Table(*headers, box=None)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        self.console.print(table)


async def _scan(client: ScanClient, args: argparse.Namespace, out: _Out) -> int:
    job = await client.submit(
        args.path, recursive=args.recursive, timeout_s=args.timeout, request_id=args.request_id,
        reprobe=args.reprobe,
    )  # fmt: skip
    if args.detach:
        _print_job(job, out)
        return EXIT_OK
    return await _follow(client, job.id, out, cancel_on_interrupt=True)


async def _follow(client: ScanClient, job_id: str, out: _Out, *, cancel_on_interrupt: bool) -> int:
    display = JobDisplay(out.console, live=not out.json and out.console.is_terminal)
    interrupts = asyncio.Queue[None]()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupts.put_nowait, None)
    watching = asyncio.create_task(_render(client, job_id, out, display))
    interrupted = asyncio.create_task(interrupts.get())
    try:
        done, _ = await asyncio.wait({watching, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if watching not in done:
            if not cancel_on_interrupt:
                display.stop()
                return EXIT_INTERRUPTED
            display.note("cancelling… (Ctrl-C again to quit at once)")
            interrupted = asyncio.create_task(interrupts.get())
            interrupted.add_done_callback(_exit_unless_cancelled)
            await _cancel_quietly(client, job_id)
        final = await watching
    finally:
        interrupted.cancel()
        loop.remove_signal_handler(signal.SIGINT)
        display.stop()
    if not out.json:
        display.summary(final)
    return _EXIT_BY_STATE.get(final.state, EXIT_RPC_ERROR)


def _exit_unless_cancelled(task: asyncio.Task[None]) -> None:
    if not task.cancelled():  # a second Ctrl-C: leave now, without waiting for the job
        os._exit(EXIT_INTERRUPTED)


async def _cancel_quietly(client: ScanClient, job_id: str) -> None:
    with contextlib.suppress(InvalidRequest):  # it ended on its own meanwhile: the watch shows how
        await client.cancel(job_id)


async def _render(client: ScanClient, job_id: str, out: _Out, display: JobDisplay) -> pb.Job:
    final = pb.Job()
    async for event in client.watch(job_id):
        final = event.job
        if out.json:
            out.emit(event)
        else:
            display.update(event.job)
    return final


def _print_job(job: pb.Job, out: _Out) -> None:
    if out.json:
        out.emit(job)
        return
    state = state_name(job.state)
    r, p = job.result, job.progress
    rows = [
        ("id", job.id), ("state", state + (" (cancel requested)" if job.cancel_requested else "")),
        ("path", job.path), ("recursive", str(job.recursive)),
        ("progress", f"{p.files_done}/{p.files_found} files"),
        ("result", f"{r.scanned} scanned, {r.added} added, {r.updated} updated, "
                   f"{r.unchanged} unchanged, {r.moved} moved, {r.restored} restored, "
                   f"{r.failed} failed, {r.removed} removed"),
        ("created", job.create_time.ToJsonString() if job.HasField("create_time") else "-"),
        ("ended", job.end_time.ToJsonString() if job.HasField("end_time") else "-"),
    ]  # fmt: skip
    if job.error:
        rows.append(("error", job.error))
    for key, value in rows:
        out.console.print(f"{key:>10}  {escape(value)}")
    for error in r.errors:
        out.console.print(f"{'':>10}  {escape(error.path)}: {escape(error.message)}")


async def _jobs(client: ScanClient, args: argparse.Namespace, out: _Out) -> int:
    state = _STATES[args.state] if args.state else pb.JOB_STATE_UNSPECIFIED
    jobs = [j async for j in client.list_jobs(state=state, limit=args.limit)]
    if out.json:
        print(json.dumps([_as_json(j) for j in jobs]))
        return EXIT_OK
    rows = [
        (
            job.id,
            state_name(job.state),
            job.path,
            f"{job.progress.files_done}/{job.progress.files_found}",
            job.create_time.ToJsonString(),
            _TRIGGERS.get(job.trigger, "-"),
        )
        for job in jobs
    ]
    out.table(("id", "state", "path", "done", "created", "trigger"), rows)
    return EXIT_OK


async def _videos(client: ScanClient, args: argparse.Namespace, out: _Out) -> int:
    videos = []
    listing = client.list_videos(prefix=args.prefix, job_id=args.job, include_missing=args.missing)
    async for video in listing:
        if args.missing and not video.HasField("missing_time"):
            continue
        videos.append(video)
        if args.limit is not None and len(videos) >= args.limit:
            break
    if out.json:
        print(json.dumps([_as_json(v) for v in videos]))
        return EXIT_OK
    if args.missing:
        rows = [(v.path, v.missing_time.ToJsonString(), _video_row(v)[4]) for v in videos]
        out.table(("path", "missing since", "codecs"), rows)
        return EXIT_OK
    out.table(("path", "duration", "resolution", "fps", "codecs"), [_video_row(v) for v in videos])
    return EXIT_OK


async def _errors(client: ScanClient, args: argparse.Namespace, out: _Out) -> int:
    errors = []
    async for error in client.list_file_errors(prefix=args.prefix):
        errors.append(error)
        if args.limit is not None and len(errors) >= args.limit:
            break
    if out.json:
        print(json.dumps([_as_json(e) for e in errors]))
        return EXIT_OK
    out.table(("path", "error", "size"), [(e.path, e.message, str(e.size_bytes)) for e in errors])
    return EXIT_OK


async def _follow_catalog(client: ScanClient, args: argparse.Namespace, out: _Out) -> int:
    after = args.after if args.after is not None else await client.catalog_sequence()
    async for event in client.follow(prefix=args.prefix, after_sequence=after):
        if out.json:
            out.emit(event)
            continue
        kind = pb.VideoEventKind.Name(event.kind).removeprefix("VIDEO_EVENT_KIND_").lower()
        line = f"{event.sequence}\t{kind}\t{event.video.path}"
        if event.previous_path:
            line += f"\t(was {event.previous_path})"
        print(line, flush=True)
    return EXIT_OK


async def _roots(client: ScanClient, out: _Out) -> int:
    roots = await client.list_roots()
    if out.json:
        print(json.dumps([_as_json(r) for r in roots]))
        return EXIT_OK
    rows = [
        (
            r.path,
            pb.WatchMode.Name(r.watch_mode).removeprefix("WATCH_MODE_").lower(),
            str(r.video_count),
            r.last_reconcile_time.ToJsonString() if r.HasField("last_reconcile_time") else "-",
            r.reason or "-",
        )
        for r in roots
    ]
    out.table(("root", "watch", "videos", "last reconcile", "reason"), rows)
    return EXIT_OK


def _video_row(v: pb.Video) -> tuple[str, str, str, str, str]:
    fps = v.frame_rate_numerator / v.frame_rate_denominator if v.frame_rate_denominator else 0
    duration = "-"
    if v.HasField("duration"):
        seconds = v.duration.ToTimedelta().total_seconds()
        duration = f"{int(seconds // 60)}:{seconds % 60:05.2f}"
    return (
        v.path,
        duration,
        f"{v.width}x{v.height}" if v.width else "-",
        f"{fps:.5g}" if fps else "-",
        "/".join(c for c in (v.video_codec, v.audio_codec) if c) or "-",
    )


async def _run(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args) as client:
        match args.command:
            case "scan":
                return await _scan(client, args, out)
            case "watch":
                return await _follow(client, args.job_id, out, cancel_on_interrupt=False)
            case "cancel":
                _print_job(await client.cancel(args.job_id), out)
            case "get":
                _print_job(await client.get(args.job_id), out)
            case "jobs":
                return await _jobs(client, args, out)
            case "videos":
                return await _videos(client, args, out)
            case "errors":
                return await _errors(client, args, out)
            case "follow":
                return await _follow_catalog(client, args, out)
            case "roots":
                return await _roots(client, out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "scan":  # the server wants an absolute path; "~/Videos" and "." work too
        args.path = os.path.abspath(os.path.expanduser(args.path))
    out = _Out(args.json)
    try:
        return asyncio.run(_run(args, out))
    except ScanClientError as exc:
        out.error(str(exc))
        return EXIT_RPC_ERROR
    except OSError as exc:  # e.g. an unreadable --token-file or TLS file
        out.error(f"{exc.strerror}: {exc.filename}")
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:  # Ctrl-C ends `follow`
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
