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

__all__ = ["JobIdFilter", "JsonFormatter", "TextFormatter", "bound_job", "configure", "escape"]

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


# Control characters (CR and LF above all) as escapes: a field can never start a line of its own.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    ord("\\"): "\\\\",
}


def escape(text: str) -> str:
    """``text`` with backslashes and control characters escaped, on one line."""
    return text.translate(_CONTROLS)


def _value(value: object) -> str:
    """A field's value: escaped, and quoted when it holds a space, a quote or an ``=``."""
    text = escape(str(value))
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, message, then key=value fields.

    Every field is escaped (see :func:`escape`), so a caller's text cannot forge a line; the
    lines of a traceback are indented, so none of them reads as a record of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = " ".join(f"{escape(k)}={_value(v)}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {escape(record.getMessage())}"
        if extra:
            text = f"{text}  {extra}"
        if record.exc_info:
            lines = self.formatException(record.exc_info).splitlines()
            text = "\n".join([text, *(f"    | {escape(line)}" for line in lines)])
        return text


def configure(level: str) -> None:
    """Send the server's logs to stderr in the format that suits where stderr goes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if sys.stderr.isatty() else JsonFormatter())
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
