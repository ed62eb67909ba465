"""Job states, their allowed transitions, and the immutable snapshots handed around."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "CancelReason",
    "FileError",
    "IllegalTransition",
    "Job",
    "JobEvent",
    "JobSpec",
    "JobState",
    "Phase",
    "Progress",
    "ScanResult",
    "display_path",
    "transition",
]


class JobState(enum.Enum):
    """Lifecycle state of a job."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED})
ACTIVE = frozenset({JobState.PENDING, JobState.RUNNING})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    # A pending job may fail without running when its path vanished before it started.
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: TERMINAL,
}


class IllegalTransition(RuntimeError):
    """A bug: code tried a state change the lifecycle forbids."""


class Phase(enum.Enum):
    """What a running job is doing."""

    UNSPECIFIED = "UNSPECIFIED"
    DISCOVERING = "DISCOVERING"
    PROBING = "PROBING"


class CancelReason(enum.Enum):
    """Why a job is asked to stop; decides the terminal state it ends in."""

    USER = "USER"
    TIMEOUT = "TIMEOUT"
    SHUTDOWN = "SHUTDOWN"


@dataclass(frozen=True, slots=True)
class FileError:
    """A per-file failure: ``path`` is shown escaped (see :func:`display_path`)."""

    path: str
    message: str


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of a running job; counts refer to work already committed to the catalog."""

    phase: Phase = Phase.UNSPECIFIED
    files_found: int = 0
    files_done: int = 0
    current_path: str = ""

    @property
    def fraction(self) -> float:
        """Share of the work done, 0..1; 0 while discovering, since the total is not known."""
        if self.phase is not Phase.PROBING:
            return 0.0
        if self.files_found == 0:
            return 1.0
        return min(1.0, self.files_done / self.files_found)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Counts of what a job did.

    ``scanned == added + updated + unchanged + moved + restored + failed``; ``removed``
    (catalogued videos found gone) is separate.
    """

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    errors: tuple[FileError, ...] = ()
    error_count: int = 0
    moved: int = 0
    restored: int = 0
    removed: int = 0

    @property
    def scanned(self) -> int:
        """Files handled so far."""
        return self.added + self.updated + self.unchanged + self.moved + self.restored + self.failed


class Trigger(enum.StrEnum):
    """What started a job."""

    API = "api"
    WATCH = "watch"  # the watcher saw changes in the job's directory
    SCHEDULE = "schedule"  # a reconcile of a whole root


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a caller asked for.

    Attributes:
        path: absolute, normalised directory.
        recursive: descend into subdirectories.
        timeout_s: run-time limit in seconds once started; ``None`` means the server default.
        request_id: idempotency key, empty when not given.
        reprobe: probe every file again, unchanged or remembered as failed.
        trigger: what started the job.
    """

    path: str
    recursive: bool = True
    timeout_s: float | None = None
    request_id: str = ""
    reprobe: bool = False
    trigger: Trigger = Trigger.API


@dataclass(frozen=True, slots=True)
class Job:
    """An immutable snapshot of a job.

    ``attempts`` counts the times a worker started the job: more than one after a restart
    resumed it.
    """

    id: str
    spec: JobSpec
    state: JobState
    create_time: datetime
    timeout_s: float
    start_time: datetime | None = None
    end_time: datetime | None = None
    cancel_requested: bool = False
    attempts: int = 0
    progress: Progress = field(default_factory=Progress)
    result: ScanResult = field(default_factory=ScanResult)
    error: str = ""

    @property
    def terminal(self) -> bool:
        """True once the job reached a final state."""
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One published change of a job.

    Attributes:
        sequence: strictly increasing per job, from 1.
        job: the full snapshot as of this event.
        state_change: True when the state or ``cancel_requested`` changed; such events are
            never coalesced away, unlike progress.
        time: when the event was published.
    """

    sequence: int
    job: Job
    state_change: bool
    time: datetime | None = None


def transition(job: Job, state: JobState, now: datetime, **changes: object) -> Job:
    """Return ``job`` moved to ``state``; the only way any code changes a job's state.

    Sets ``start_time`` on entering RUNNING and ``end_time`` on entering a terminal state.

    Raises:
        IllegalTransition: the lifecycle does not allow ``job.state -> state``.
    """
    if state not in _ALLOWED.get(job.state, frozenset()):
        raise IllegalTransition(f"job {job.id}: {job.state.value} -> {state.value}")
    if state is JobState.RUNNING:
        changes["start_time"] = now
    if state in TERMINAL:
        changes["end_time"] = now
    return replace(job, state=state, **changes)  # type: ignore[arg-type]


def display_path(path: str | bytes) -> str:
    """Show a file-system path as valid UTF-8, with undecodable bytes backslash-escaped."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")
