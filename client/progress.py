"""How a running job looks in a terminal: a live rich progress bar, or plain lines elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from scanjobs.v1 import scanjobs_pb2 as pb

__all__ = ["JobDisplay"]

_PLAIN_INTERVAL_S = 2.0


class _RateColumn(ProgressColumn):
    """Files per second, as rich measures it from the updates."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} files/s" if task.speed else "", style="progress.data.speed")


def state_name(state: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``RUNNING``."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def phase_name(job: pb.Job) -> str:
    """What the job is doing, in words."""
    if job.state != pb.JOB_STATE_RUNNING:
        return state_name(job.state).lower()
    if job.cancel_requested:
        return "cancelling"
    return "discovering" if job.progress.phase == pb.SCAN_PHASE_DISCOVERING else "probing"


class JobDisplay:
    """Shows one job's events: a live bar on a terminal, a line per change otherwise.

    Args:
        console: where to draw.
        live: draw a live progress bar (only on a terminal).
    """

    def __init__(self, console: Console, *, live: bool) -> None:
        self._console = console
        self._started = time.monotonic()
        self._last_key: tuple[int, bool, int] | None = None
        self._last_line = 0.0
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if live:
            self._progress = Progress(
                TextColumn("{task.description:<11}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[current]}", style="dim"),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task("pending", total=None, current="")
            self._progress.start()

    def update(self, job: pb.Job) -> None:
        """Show the job as of one event."""
        key = (job.state, job.cancel_requested, job.attempts)
        changed = key != self._last_key
        self._last_key = key
        if self._progress is not None and self._task is not None:
            p = job.progress
            probing = p.phase == pb.SCAN_PHASE_PROBING
            self._progress.update(
                self._task,
                description=phase_name(job),
                completed=p.files_done,
                total=p.files_found if probing else None,
                current=escape(_tail(p.current_path, 48)),
            )
            return
        now = time.monotonic()
        if changed or now - self._last_line >= _PLAIN_INTERVAL_S:
            self._last_line = now
            p = job.progress
            self._console.print(
                f"{phase_name(job)}: {p.files_done}/{p.files_found} files", markup=False
            )

    def note(self, text: str) -> None:
        """A message above the bar (or a plain line)."""
        self._console.print(text, markup=False)

    def stop(self) -> None:
        """Remove the live bar; idempotent."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, job: pb.Job) -> None:
        """The final result and the first errors."""
        r = job.result
        elapsed = time.monotonic() - self._started
        if job.HasField("start_time") and job.HasField("end_time"):
            elapsed = (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds()
        self._console.print(
            f"{state_name(job.state)} in {elapsed:.2f}s: {r.scanned} scanned, {r.added} added, "
            f"{r.updated} updated, {r.unchanged} unchanged, {r.moved} moved, "
            f"{r.restored} restored, {r.failed} failed, {r.removed} removed",
            markup=False,
        )
        if job.error:
            self._console.print(f"error: {job.error}", markup=False)
        for error in r.errors[:10]:
            self._console.print(f"  {error.path}: {error.message}", markup=False)
        if r.error_count > min(len(r.errors), 10):
            self._console.print(
                f"  … and {r.error_count - min(len(r.errors), 10)} more", markup=False
            )


def _tail(path: str, width: int) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]
