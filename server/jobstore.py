"""Where a queue keeps jobs and their events: the :class:`JobStore` seam, and the in-memory
store (the test double, and the store of a server without a data directory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from .jobs import Job, JobEvent

__all__ = ["InMemoryJobStore", "JobStore", "StoredJob"]


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
