"""Structured logging: JSON lines when stderr is not a terminal, key=value text when it is.

Fields passed with ``extra={...}`` (``method``, ``code``, ...) become fields of the line. The
id of the job being worked on is bound once with :func:`bound_job` and lands on every line
logged meanwhile, in that task and in the tasks it starts (``contextvars``), so every line
about a job can be found by its id without each call site passing it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

__all__ = ["JobIdFilter", "bound_job", "configure"]

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("scanjobs_job_id", default="")


@contextlib.contextmanager
def bound_job(job_id: str) -> Iterator[None]:
    """Tag every log line of the current context (and of tasks started in it) with ``job_id``."""
    token = _JOB_ID.set(job_id)
    try:
        yield
    finally:
        _JOB_ID.reset(token)


class JobIdFilter(logging.Filter):
    """Adds the bound job id (see :func:`bound_job`) to a record as its ``job_id`` field."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = _JOB_ID.get()
        if job_id and not hasattr(record, "job_id"):
            record.job_id = job_id
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, message, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if extra:
            text = f"{text}  {extra}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def configure(level: str) -> None:
    """Send the server's logs to stderr in the format that suits where stderr goes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if sys.stderr.isatty() else JsonFormatter())
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
