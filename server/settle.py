"""Gathering a burst of file system changes into scans of just the affected directories.

The watcher (``server.library_watch``) records each change it is told of; :meth:`Settler.ready`
then gives the directories whose burst has settled: no change for ``settle_s`` seconds, and
every changed video file's size and mtime the same for ``settle_s`` seconds (so that a slow
copy is probed once, complete). A changed directory is scanned alone (non-recursively); a
new directory is scanned with everything below it. Too many directories at once become one
recursive scan of the directory they share, so a huge copy makes a bounded number of jobs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from .catalog import FileStamp, parent_dir

__all__ = ["ChangeType", "ScanRequest", "Settler"]


class ChangeType(Enum):
    """What the file system said happened at a path."""

    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True, order=True)
class ScanRequest:
    """A directory to scan, alone or with everything below it."""

    path: bytes
    recursive: bool


@dataclass(slots=True)
class _Pending:
    """A directory with changes not yet scanned."""

    recursive: bool
    last_change: float
    files: dict[bytes, tuple[FileStamp | None, float]] = field(default_factory=dict)


_Stat = Callable[[bytes], os.stat_result]


class Settler:
    """The changes seen under one root, per directory, until they settle.

    Args:
        root: the watched root; nothing above it is ever scanned.
        settle_s: how long a directory must be quiet, and its files' stamps unchanged.
        extensions: video file extensions (lower case, with the dot, as bytes).
        max_requests: above this many directories at once, one recursive scan of the
            directory they share is asked for instead.
    """

    def __init__(
        self,
        root: bytes,
        settle_s: float,
        extensions: Iterable[bytes],
        *,
        max_requests: int = 8,
        stat_path: _Stat = os.stat,
    ) -> None:
        self._root = root.rstrip(b"/") or b"/"
        self._settle_s = settle_s
        self._extensions = tuple(extensions)
        self._max = max_requests
        self._stat = stat_path
        self._pending: dict[bytes, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def record(self, change: ChangeType, path: bytes, now: float) -> None:
        """Note a change at ``path`` (below the root) seen at ``now`` (monotonic seconds)."""
        if change is ChangeType.DELETED:
            self._note(parent_dir(path), now, path, None)
            return
        try:
            st = self._stat(path)
        except OSError:  # gone again already: its directory is what changed
            self._note(parent_dir(path), now, path, None)
            return
        if stat.S_ISDIR(st.st_mode):
            if change is ChangeType.ADDED:
                self._note(path, now, recursive=True)
        elif stat.S_ISREG(st.st_mode) and path.lower().endswith(self._extensions):
            self._note(parent_dir(path), now, path, FileStamp(st.st_size, st.st_mtime_ns))

    def _note(
        self,
        directory: bytes,
        now: float,
        path: bytes | None = None,
        stamp: FileStamp | None = None,
        *,
        recursive: bool = False,
    ) -> None:
        key = self._owner(directory)
        if key is None:
            key = directory
            if recursive:  # a new directory takes over the changes below it
                self._absorb(directory)
        entry = self._pending.setdefault(key, _Pending(recursive, now))
        entry.last_change = now
        if path is not None:
            entry.files[path] = (stamp, now)

    def _owner(self, directory: bytes) -> bytes | None:
        """The pending recursive directory that covers ``directory``, if any."""
        for key, entry in self._pending.items():
            if entry.recursive and (directory == key or directory.startswith(key + b"/")):
                return key
        return None

    def _absorb(self, directory: bytes) -> None:
        prefix = directory + b"/"
        merged = _Pending(True, 0.0)
        for key in [k for k in self._pending if k.startswith(prefix)]:
            merged.files.update(self._pending.pop(key).files)
        if merged.files:
            self._pending[directory] = merged

    def ready(self, now: float) -> list[ScanRequest]:
        """The scans whose directories have settled at ``now``; they are forgotten here."""
        settled = [key for key, entry in self._pending.items() if self._settled(entry, now)]
        requests = [ScanRequest(k, self._pending.pop(k).recursive) for k in settled]
        if len(requests) > self._max:
            shared = os.path.commonpath([r.path for r in requests])
            if not (shared + b"/").startswith(self._root.rstrip(b"/") + b"/"):
                shared = self._root
            return [ScanRequest(shared, True)]
        return sorted(requests)

    def _settled(self, entry: _Pending, now: float) -> bool:
        if now - entry.last_change < self._settle_s:
            return False
        quiet = True
        for path, (stamp, since) in entry.files.items():
            current = self._stamp(path)
            if current != stamp:
                entry.files[path] = (current, now)
                quiet = False
            elif current is not None and now - since < self._settle_s:
                quiet = False
        return quiet

    def _stamp(self, path: bytes) -> FileStamp | None:
        try:
            st = self._stat(path)
        except OSError:
            return None
        return FileStamp(st.st_size, st.st_mtime_ns)
