"""Job states, their allowed transitions, and the immutable snapshots handed around."""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

from .errors import AlreadyExists, FailedPrecondition, ScanJobsError

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
    "cancel_reply",
    "display_path",
    "ending",
    "failure_text",
    "finished",
    "new_job",
    "same_request",
    "start_or_resume",
    "transition",
]

log = logging.getLogger(__name__)


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


# -- decisions shared by every queue: pure functions of a job and the time --------------------

_OUTCOME = {CancelReason.USER: JobState.CANCELLED, CancelReason.TIMEOUT: JobState.TIMEOUT}


def new_job(spec: JobSpec, now: datetime, default_timeout_s: float) -> Job:
    """A freshly submitted PENDING job; ``spec.timeout_s`` wins over ``default_timeout_s``."""
    return Job(
        id=uuid.uuid4().hex,
        spec=spec,
        state=JobState.PENDING,
        create_time=now,
        timeout_s=spec.timeout_s or default_timeout_s,
    )


def same_request(earlier: Job, spec: JobSpec) -> Job:
    """The answer to a submit whose ``request_id`` created ``earlier``.

    Raises:
        AlreadyExists: the request id was used for a different request.
    """
    if earlier.spec != spec:
        raise AlreadyExists(
            f"request_id {spec.request_id!r} was already used for a different request",
            reason="REQUEST_ID_REUSED",
        )
    return earlier


def start_or_resume(job: Job, now: datetime, max_attempts: int) -> Job:
    """What a worker that takes ``job`` makes of it.

    A PENDING job starts. A RUNNING one (its server stopped or its replica vanished) resumes
    from the start of its walk with nothing counted yet, unless a cancel was requested (it
    ends CANCELLED) or it was interrupted ``max_attempts`` times (it ends FAILED).
    """
    if job.state is JobState.PENDING:
        return transition(job, JobState.RUNNING, now, attempts=1)
    if job.cancel_requested:
        return transition(job, JobState.CANCELLED, now)
    if job.attempts >= max_attempts:
        error = (
            f"the job was interrupted {job.attempts} times (server restarts); giving up."
            " Submit it again to retry."
        )
        return transition(job, JobState.FAILED, now, error=error)
    log.info("resuming job %s", job.id)
    return replace(job, attempts=job.attempts + 1, progress=Progress(), result=ScanResult())


def cancel_reply(job: Job, now: datetime, *, idle: bool) -> Job:
    """The job a cancel request leaves behind; ``job`` itself when there is nothing to change.

    A PENDING job, or a RUNNING one that no handler runs (``idle``: waiting to resume), ends
    CANCELLED at once; a running one gets ``cancel_requested`` and stops at its next safe
    point. A retried cancel gets the same answer.

    Raises:
        FailedPrecondition: the job already ended COMPLETED, FAILED or TIMEOUT.
    """
    if job.state is JobState.CANCELLED or job.cancel_requested:
        return job
    if job.terminal:
        raise FailedPrecondition(
            f"job {job.id} already ended {job.state.value}", reason="JOB_ALREADY_ENDED"
        )
    if job.state is JobState.PENDING:
        return transition(job, JobState.CANCELLED, now)
    if idle:
        return transition(job, JobState.CANCELLED, now, cancel_requested=True)
    return replace(job, cancel_requested=True)


def ending(job: Job, reason: CancelReason | None, result: ScanResult, now: datetime) -> Job | None:
    """How a job whose handler returned (or was stopped for ``reason``) ends; None when a
    shutdown stopped it, so that it stays RUNNING and resumes."""
    if reason is CancelReason.SHUTDOWN:
        return None
    state = _OUTCOME[reason] if reason else JobState.COMPLETED
    error = (
        f"job exceeded its timeout of {job.timeout_s:g} s" if reason is CancelReason.TIMEOUT else ""
    )
    return finished(job, state, result, error, now)


def finished(job: Job, state: JobState, result: ScanResult, error: str, now: datetime) -> Job:
    """``job`` moved to the terminal ``state`` with its final result."""
    progress = job.progress
    if state is JobState.COMPLETED:
        progress = replace(progress, files_found=progress.files_done, current_path="")
    log.info("job %s ended %s", job.id, state.value)
    return transition(job, state, now, result=result, error=error, progress=progress)


def failure_text(exc: Exception) -> str:
    """The error a failed job shows: an expected error's message, or a bare internal error
    (the traceback goes to the log)."""
    if isinstance(exc, ScanJobsError):
        return exc.message
    log.error("job handler crashed", exc_info=exc)
    return "internal error while scanning"
