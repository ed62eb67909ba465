"""Where a queue keeps jobs and their events: the :class:`JobStore` seam, and the in-memory
store (the test double, and the store of a server without a data directory)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from .jobs import (
    FileError,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    Phase,
    Progress,
    ScanResult,
    Trigger,
)

__all__ = [
    "InMemoryJobStore",
    "JobStore",
    "StoredJob",
    "decode_job",
    "encode_job",
    "event_from_row",
    "time_ns",
]


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as a store gives it back at start-up, with its latest stored event."""

    job: Job
    last_event: JobEvent


class JobStore(Protocol):
    """Where jobs and their events are kept across restarts."""

    async def load(self) -> list[StoredJob]:
        """Every kept job, in submission order."""
        ...

    async def append(self, events: Sequence[JobEvent]) -> None:
        """Commit events, and each job's snapshot as of its latest event, atomically."""
        ...

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        """Kept events of a job with a greater sequence, in order."""
        ...

    async def thin(self, job_id: str) -> None:
        """Drop an ended job's progress events, keeping its state changes."""
        ...

    async def prune(self, ended_before: datetime) -> list[str]:
        """Delete jobs that ended before ``ended_before``, and their events; return their ids."""
        ...

    async def delete(self, job_ids: Sequence[str]) -> None:
        """Delete these jobs and their events."""
        ...


class InMemoryJobStore:
    """A :class:`JobStore` that forgets everything with the process: the test double."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}

    async def load(self) -> list[StoredJob]:
        return [StoredJob(job, self._events[job_id][-1]) for job_id, job in self._jobs.items()]

    async def append(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            self._jobs[event.job.id] = event.job
            self._events.setdefault(event.job.id, []).append(event)

    async def events_after(self, job_id: str, after_sequence: int) -> list[JobEvent]:
        return [e for e in self._events.get(job_id, []) if e.sequence > after_sequence]

    async def thin(self, job_id: str) -> None:
        events = self._events[job_id]
        self._events[job_id] = [e for e in events if e.state_change]

    async def prune(self, ended_before: datetime) -> list[str]:
        gone = [
            i for i, j in self._jobs.items() if j.end_time is not None and j.end_time < ended_before
        ]
        await self.delete(gone)
        return gone

    async def delete(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self._jobs.pop(job_id, None)
            self._events.pop(job_id, None)


# -- how a job and its events are stored (SQLite and PostgreSQL alike) -------------------


def event_from_row(row: tuple[Any, ...]) -> JobEvent:
    """An event from its stored columns: (sequence, state_change, snapshot, time_ns)."""
    sequence, state_change, snapshot, nanos = row
    return JobEvent(sequence, decode_job(snapshot), bool(state_change), _time(nanos))


def time_ns(value: datetime | None) -> int | None:
    """A time as integer nanoseconds since the epoch (microsecond precision), or None."""
    if value is None:
        return None
    return int(value.timestamp() * 1_000_000) * 1000


def _time(ns: int | None) -> datetime | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC)


def encode_job(job: Job) -> str:
    """A job snapshot as compact JSON (times in integer nanoseconds)."""
    spec, progress, result = job.spec, job.progress, job.result
    return json.dumps(
        {
            "id": job.id,
            "spec": [spec.path, spec.recursive, spec.timeout_s, spec.request_id, spec.reprobe,
                     spec.trigger.value],
            "state": job.state.value,
            "times": [time_ns(job.create_time), time_ns(job.start_time), time_ns(job.end_time)],
            "timeout_s": job.timeout_s,
            "cancel": job.cancel_requested,
            "attempts": job.attempts,
            "progress": [
                progress.phase.value, progress.files_found, progress.files_done,
                progress.current_path,
            ],
            "result": [
                result.added, result.updated, result.unchanged, result.failed,
                [[e.path, e.message] for e in result.errors], result.error_count,
                result.moved, result.restored, result.removed,
            ],
            "error": job.error,
        },
        separators=(",", ":"),
    )  # fmt: skip


def _spec(fields: list[Any]) -> JobSpec:
    # Snapshots written before triggers have none: they came through the API.
    path, recursive, timeout_s, request_id, reprobe, *trigger = fields
    return JobSpec(path, recursive, timeout_s, request_id, reprobe, Trigger(*trigger or ["api"]))


def decode_job(text: str) -> Job:
    """Inverse of :func:`encode_job`."""
    d = json.loads(text)
    created, started, ended = d["times"]
    phase, found, done, current = d["progress"]
    # Snapshots written before reconciliation have no moved, restored and removed.
    added, updated, unchanged, failed, errors, error_count, *reconciled = d["result"]
    return Job(
        id=d["id"],
        spec=_spec(d["spec"]),
        state=JobState(d["state"]),
        create_time=_time(created) or datetime.fromtimestamp(0, UTC),
        timeout_s=d["timeout_s"],
        start_time=_time(started),
        end_time=_time(ended),
        cancel_requested=d["cancel"],
        attempts=d["attempts"],
        progress=Progress(Phase(phase), found, done, current),
        result=ScanResult(
            added,
            updated,
            unchanged,
            failed,
            tuple(FileError(*e) for e in errors),
            error_count,
            *reconciled,
        ),
        error=d["error"],
    )
