"""A live library (``--watch``): each root is watched, and what changes is scanned.

Each root is reconciled once at start-up and then every ``reconcile_s`` (a full recursive
scan, ``Trigger.SCHEDULE``: events can be missed). In between, file system events
(``watchfiles``: inotify on Linux) are gathered per directory by a :class:`Settler` and,
once a burst settles, become scans of just the affected directories (``Trigger.WATCH``).

Never silently blind: on a network file system (nfs, cifs/smb, sshfs, …: events do not
reach it) or when the inotify watch limit is reached (``ENOSPC``) a root is polled every
``poll_s`` instead, and says so: its :class:`RootState` (``ListRoots``), a metric and a
warning log line. The domain core: no grpc here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import watchfiles

from .errors import ScanJobsError
from .jobs import JobSpec, JobState, Trigger
from .queue import JobQueue
from .rootcheck import RootChecks
from .settle import ChangeType, ScanRequest, Settler

__all__ = [
    "NETWORK_FILESYSTEMS",
    "LibraryWatcher",
    "QueueRunner",
    "RootState",
    "ScanRunner",
    "WatchConfig",
    "WatchMode",
    "network_filesystem",
]

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p",
    "ceph", "glusterfs", "fuse.glusterfs", "afs", "lustre", "fuse.rclone", "davfs", "fuse.s3fs",
})  # fmt: skip
_CHANGES = {
    watchfiles.Change.added: ChangeType.ADDED,
    watchfiles.Change.modified: ChangeType.MODIFIED,
    watchfiles.Change.deleted: ChangeType.DELETED,
}


class WatchMode(StrEnum):
    """How a root is watched."""

    EVENTS = "events"
    POLLING = "polling"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class RootState:
    """A root, how it is watched and why, and when it was last reconciled."""

    path: str
    mode: WatchMode
    reason: str = ""
    last_reconcile_ns: int | None = None


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """Attributes:
    settle_s: quiet time (and unchanged size and mtime) before changed files are scanned.
    poll_s: the polling interval of a root that events cannot watch.
    reconcile_s: the interval of the full reconcile of each root.
    extensions: video file extensions (lower case, with the dot).
    max_requests: directories scanned at once before one shared recursive scan instead.
    """

    settle_s: float = 2.0
    poll_s: float = 60.0
    reconcile_s: float = 24 * 3600.0
    extensions: frozenset[str] = field(default_factory=frozenset)
    max_requests: int = 8


class ScanRunner(Protocol):
    """How the watcher starts scans: the job queue, seen from here."""

    async def submit(self, path: str, *, recursive: bool, trigger: Trigger) -> str:
        """Submit a scan; returns its job id."""
        ...

    async def wait(self, job_id: str) -> JobState:
        """The state the job ended in."""
        ...


def network_filesystem(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the network file system ``path`` lies on, or None if it is local."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = parts[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, rest.split()[0]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def event_source(
    root: str, *, polling: bool, poll_s: float
) -> AsyncIterator[set[tuple[watchfiles.Change, str]]]:
    """The batches of changes under ``root`` (inotify, or notify's poll watcher)."""
    return watchfiles.awatch(
        root,
        force_polling=polling,
        poll_delay_ms=int(poll_s * 1000),
        debounce=400,
        step=50,
        recursive=True,
        ignore_permission_denied=True,
        watch_filter=None,
    )


def _is_watch_limit(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc)


class RootWatcher:
    """One root: its reconcile schedule, its event (or poll) watch, its settling changes."""

    def __init__(
        self,
        root: str,
        runner: ScanRunner,
        config: WatchConfig,
        on_state: Callable[[RootState], None],
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._root = root
        self._runner = runner
        self._config = config
        self._on_state = on_state
        self._clock_ns = clock_ns
        extensions = [os.fsencode(e) for e in config.extensions]
        self._settler = Settler(
            os.fsencode(root), config.settle_s, extensions, max_requests=config.max_requests
        )
        self._changed = asyncio.Event()
        fstype = network_filesystem(root)
        if fstype is None:
            self.state = RootState(root, WatchMode.EVENTS)
        else:
            self.state = RootState(
                root, WatchMode.POLLING,
                f"{root} is on a network file system ({fstype}): events do not reach it",
            )  # fmt: skip

    async def run(self) -> None:
        """Watch until cancelled."""
        self._publish(self.state)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._reconcile_forever())
            group.create_task(self._watch_forever())
            group.create_task(self._scan_settled())

    def _publish(self, state: RootState) -> None:
        self.state = state
        if state.mode is WatchMode.POLLING:
            log.warning(
                "root polled, not watched by events",
                extra={"root": state.path, "reason": state.reason,
                       "poll_interval_s": self._config.poll_s},
            )  # fmt: skip
        self._on_state(state)

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                job_id = await self._runner.submit(
                    self._root, recursive=True, trigger=Trigger.SCHEDULE
                )
                if await self._runner.wait(job_id) is JobState.COMPLETED:
                    self.state = replace(self.state, last_reconcile_ns=self._clock_ns())
                    self._on_state(self.state)
            except ScanJobsError as exc:
                log.warning("reconcile not started", extra={"root": self._root, "error": str(exc)})
            await asyncio.sleep(self._config.reconcile_s)

    async def _watch_forever(self) -> None:
        while True:
            polling = self.state.mode is WatchMode.POLLING
            try:
                async for batch in event_source(
                    self._root, polling=polling, poll_s=self._config.poll_s
                ):
                    self._record(batch)
                return  # the root itself went away: the reconcile reports it
            except (OSError, RuntimeError) as exc:
                if polling:
                    log.warning("polling failed", extra={"root": self._root, "error": str(exc)})
                    await asyncio.sleep(self._config.poll_s)
                    continue
                reason = (
                    "the inotify watch limit is reached (ENOSPC): raise "
                    "fs.inotify.max_user_watches to watch by events"
                    if _is_watch_limit(exc)
                    else f"file system events failed: {exc}"
                )
                self._publish(replace(self.state, mode=WatchMode.POLLING, reason=reason))

    def _record(self, batch: Iterable[tuple[watchfiles.Change, str]]) -> None:
        now = time.monotonic()
        for change, path in batch:
            self._settler.record(_CHANGES[change], os.fsencode(path), now)
        self._changed.set()

    async def _scan_settled(self) -> None:
        tick = max(0.05, min(self._config.settle_s / 4, 0.5))
        while True:
            await self._changed.wait()
            self._changed.clear()
            while self._settler:
                await asyncio.sleep(tick)
                for request in self._settler.ready(time.monotonic()):
                    await self._submit(request)

    async def _submit(self, request: ScanRequest) -> None:
        path = os.fsdecode(request.path)
        try:
            await self._runner.submit(path, recursive=request.recursive, trigger=Trigger.WATCH)
        except ScanJobsError as exc:  # gone again, or the queue is full: the reconcile catches up
            log.warning("watch scan not started", extra={"path": path, "error": str(exc)})


class LibraryWatcher:
    """Every root's :class:`RootWatcher`, and their states for ``ListRoots``."""

    def __init__(
        self,
        roots: Sequence[str],
        runner: ScanRunner,
        config: WatchConfig,
        *,
        on_state: Callable[[RootState], None] = lambda state: None,
        idle_reason: str = "not watched yet",
    ) -> None:
        self._roots = list(roots)
        self._runner = runner
        self._config = config
        self._on_state = on_state
        self._idle_reason = idle_reason
        self._states = {r: RootState(r, WatchMode.OFF, idle_reason) for r in roots}

    def states(self) -> list[RootState]:
        """Each root's state, in the configured order."""
        return [self._states[r] for r in self._roots]

    def _update(self, state: RootState) -> None:
        self._states[state.path] = state
        self._on_state(state)

    async def run(self) -> None:
        """Watch every root until cancelled; then each root is reported OFF again."""
        watchers = [RootWatcher(r, self._runner, self._config, self._update) for r in self._roots]
        try:
            async with asyncio.TaskGroup() as group:
                for watcher in watchers:
                    group.create_task(watcher.run())
        finally:
            for root in self._roots:
                previous = self._states[root]
                self._update(replace(previous, mode=WatchMode.OFF, reason=self._idle_reason))


class QueueRunner:
    """The :class:`ScanRunner` of a job queue: scans submitted as any client's are."""

    def __init__(self, queue: JobQueue, checks: RootChecks) -> None:
        self._queue = queue
        self._checks = checks

    async def submit(self, path: str, *, recursive: bool, trigger: Trigger) -> str:
        # In the helper process, with a deadline: a root on a dead share costs this scan an
        # IoTimeout (a ScanJobsError), never a thread of the server stuck in the kernel.
        checked = await self._checks.check(path)
        job = await self._queue.submit(JobSpec(checked, recursive, trigger=trigger))
        return job.id

    async def wait(self, job_id: str) -> JobState:
        subscription = await self._queue.watch(job_id)
        state = JobState.PENDING
        try:
            async for event in subscription:
                state = event.job.state
        finally:
            subscription.close()
        return state


async def cancel_quietly(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
