"""What the server and its scan workers say to each other, and how it crosses the pipe.

The server hands a scan worker a few directories at a time (:class:`DirectoryTask`); the
worker answers, directory after directory, with what it listed (:class:`Listed`: the
sub-folders to hand out next) and what each of its commits counted (:class:`Committed`), and
then :class:`Done`, or :class:`Fault` when the catalog failed. Every message is a small JSON
frame behind a 4-byte length; paths, which are raw bytes, travel as Latin-1 strings (one
character per byte, any byte). The worker never parses a media file itself (its probe
processes do), so it is trusted as much as the server, and its frames are checked for shape
only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from .catalog import ScanCounts
from .roots import Folder

__all__ = [
    "FRAME",
    "MAX_FRAME",
    "BadFrame",
    "Committed",
    "DirectoryTask",
    "Done",
    "Fault",
    "Listed",
    "Ready",
    "Reply",
    "WorkerSettings",
    "decode_reply",
    "decode_settings",
    "decode_task",
    "encode",
]

FRAME = struct.Struct(">I")
MAX_FRAME = 64 * 2**20  # a listing of a huge folder's sub-folders fits many times over


class BadFrame(Exception):
    """A frame that is not one of ours."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a scan worker is told once, when it starts.

    Attributes:
        database: a ``postgresql://`` URL, or the path of the SQLite file. It travels on the
            pipe, never on the command line or in the environment.
        roots: the allowed roots, as configured.
        resolutions: each root with its symlinks resolved, as the server found them at its
            start (a worker never waits on a root whose share is down).
        extensions: the video extensions (lower case, with the dot).
        seen_resolution_ns, chunk, probe_batch: see ``server.scan.ScanConfig``.
        probe_command: the probe worker's command line.
        probe_processes: probe processes of this worker.
        probe_timeout_s, probe_memory_mib, probe_user: see ``server.probe.ProbePool``.
        io_timeout_s: the deadline of a filesystem call (``--io-timeout``).
        io_concurrency: files probed or stated at once (``--io-concurrency``).
    """

    database: str
    roots: tuple[str, ...]
    resolutions: tuple[str, ...]
    extensions: tuple[str, ...]
    seen_resolution_ns: int
    chunk: int
    probe_batch: int
    probe_command: tuple[str, ...]
    probe_processes: int = 1
    probe_timeout_s: float = 30.0
    probe_memory_mib: int = 0
    probe_user: str | None = None
    io_timeout_s: float = 30.0
    io_concurrency: int = 1


@dataclass(frozen=True, slots=True)
class DirectoryTask:
    """Directories of a job, for one worker, done one after the other.

    Attributes:
        job_id, since_ns, reprobe, recursive: the job's (see ``server.reconcile``).
        folder: the job's folder, as the server located it.
        directories: the directories, relative to ``folder`` (``b""`` for the folder
            itself).
        clock_offset_ns: the server's clock minus the worker's wall clock, so that the
            times a worker writes are the server's.
        errors_wanted: per-file errors the job can still keep: the worker sends at most
            this many with its commits, and only the count of the rest.
    """

    job_id: str
    since_ns: int
    reprobe: bool
    recursive: bool
    folder: Folder
    directories: tuple[bytes, ...]
    clock_offset_ns: int = 0
    errors_wanted: int = 2**31


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker is up: catalog open, probe processes started."""


@dataclass(frozen=True, slots=True)
class Listed:
    """The next directory of the task was listed.

    Attributes:
        found: its video files and unreadable entries.
        folders: its sub-folders, relative to the job's folder, in listing order.
        error: the directory's own error (path, message) when it could not be listed
            completely.
    """

    found: int
    folders: tuple[bytes, ...] = ()
    error: tuple[bytes, str] | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """A commit landed (or, with no row to write, was not needed).

    Attributes:
        counts: what it counted, as applied.
        errors: per-file errors behind it, (path, message).
        current: the last path it covered.
        written: the counts were committed with rows; False when there was nothing to
            write (unchanged files, remembered failures), so they live only in this reply.
        probe_s: seconds each file probed since the last report took.
        errors_dropped: per-file errors behind it not sent (the job keeps no more of
            them): only counted.
    """

    counts: ScanCounts
    errors: tuple[tuple[bytes, str], ...] = ()
    current: bytes = b""
    written: bool = True
    probe_s: tuple[float, ...] = field(default=())
    errors_dropped: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    """The task is finished: every directory, or (``retire``) as many as the worker could
    before a filesystem call got stuck past ``--io-timeout``. The directories it did not
    list are handed out again, and the worker, which has a thread stuck in the kernel, is
    replaced."""

    retire: bool = False


@dataclass(frozen=True, slots=True)
class Fault:
    """The task could not be finished: ``kind`` names the domain error (``StorageFull``,
    ``StorageIOError``, ``DatabaseUnavailable``), or ``internal``."""

    kind: str
    message: str


Reply = Ready | Listed | Committed | Done | Fault
_REPLIES: dict[str, type[Reply]] = {c.__name__: c for c in (Ready, Listed, Committed, Done, Fault)}


def _b(data: bytes) -> str:
    return data.decode("latin-1")


def _raw(text: object) -> bytes:
    if not isinstance(text, str):
        raise BadFrame("a path is not a string")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise BadFrame("a path is not Latin-1") from None


def encode(message: WorkerSettings | DirectoryTask | Reply) -> bytes:
    """One frame: length, then the message as JSON."""
    data = _plain(message)
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:  # a text with a lone surrogate (an OS message): as "?"
        body = json.dumps(data, ensure_ascii=False).encode("utf-8", "replace")
    return FRAME.pack(len(body)) + body


def _plain(message: object) -> dict[str, Any]:
    data: dict[str, Any]
    if isinstance(message, DirectoryTask):
        folder = message.folder
        data = {"job_id": message.job_id, "since_ns": message.since_ns,
                "reprobe": message.reprobe, "recursive": message.recursive,
                "folder": [_b(folder.path), _b(folder.root), _b(folder.relative)],
                "directories": [_b(d) for d in message.directories],
                "clock_offset_ns": message.clock_offset_ns,
                "errors_wanted": message.errors_wanted}  # fmt: skip
    elif isinstance(message, Listed):
        error = None if message.error is None else [_b(message.error[0]), message.error[1]]
        data = {"found": message.found, "folders": [_b(f) for f in message.folders],
                "error": error}  # fmt: skip
    elif isinstance(message, Committed):
        data = {"counts": list(message.counts.as_tuple()),
                "errors": [[_b(p), m] for p, m in message.errors],
                "current": _b(message.current), "written": message.written,
                "probe_s": list(message.probe_s),
                "errors_dropped": message.errors_dropped}  # fmt: skip
    elif isinstance(message, Fault):
        data = {"kind": message.kind, "message": message.message}
    elif isinstance(message, Done):
        data = {"retire": message.retire}
    elif isinstance(message, WorkerSettings):
        data = asdict(message)
    else:
        data = {}
    data["type"] = type(message).__name__
    return data


def _load(payload: bytes, expected: str) -> dict[str, Any]:
    try:
        data = orjson.loads(payload)
    except ValueError:
        raise BadFrame("a frame is not JSON") from None
    if not isinstance(data, dict) or (expected and data.get("type") != expected):
        raise BadFrame(f"expected a {expected or 'message'}")
    return data


def decode_settings(payload: bytes) -> WorkerSettings:
    """The settings frame a worker reads first."""
    data = _load(payload, "WorkerSettings")
    del data["type"]
    data["roots"], data["extensions"] = tuple(data["roots"]), tuple(data["extensions"])
    data["resolutions"] = tuple(data["resolutions"])
    data["probe_command"] = tuple(data["probe_command"])
    return WorkerSettings(**data)


def decode_task(payload: bytes) -> DirectoryTask:
    """A task frame."""
    data = _load(payload, "DirectoryTask")
    path, root, relative = (_raw(p) for p in data["folder"])
    return DirectoryTask(
        job_id=str(data["job_id"]),
        since_ns=int(data["since_ns"]),
        reprobe=bool(data["reprobe"]),
        recursive=bool(data["recursive"]),
        folder=Folder(path, root, relative),
        directories=tuple(_raw(d) for d in data["directories"]),
        clock_offset_ns=int(data["clock_offset_ns"]),
        errors_wanted=int(data["errors_wanted"]),
    )


def decode_reply(payload: bytes) -> Reply:
    """A reply frame.

    Raises:
        BadFrame: it is not a reply of ours.
    """
    data = _load(payload, "")
    kind = _REPLIES.get(str(data.get("type")))
    try:
        if kind is Listed:
            error = data["error"]
            return Listed(
                int(data["found"]),
                tuple(_raw(f) for f in data["folders"]),
                None if error is None else (_raw(error[0]), str(error[1])),
            )
        if kind is Committed:
            return Committed(
                ScanCounts(*(int(n) for n in data["counts"])),
                tuple((_raw(p), str(m)) for p, m in data["errors"]),
                _raw(data["current"]),
                bool(data["written"]),
                tuple(float(s) for s in data["probe_s"]),
                int(data["errors_dropped"]),
            )
        if kind is Fault:
            return Fault(str(data["kind"]), str(data["message"]))
        if kind is Done:
            return Done(bool(data["retire"]))
        if kind is Ready:
            return Ready()
    except (KeyError, TypeError, ValueError) as exc:
        raise BadFrame(f"a malformed {kind.__name__ if kind else 'reply'}: {exc}") from None
    raise BadFrame(f"unknown reply type {data.get('type')!r}")
