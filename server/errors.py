"""Expected failures of the domain, each with a stable machine-readable reason.

The transport maps each class to one gRPC status code in exactly one place
(``server.service``); the core never imports grpc.

ScanJobsError
├── InvalidArgument      INVALID_ARGUMENT     (carries field violations)
├── PermissionDenied     PERMISSION_DENIED
├── NotFound             NOT_FOUND
├── FailedPrecondition   FAILED_PRECONDITION
├── AlreadyExists        ALREADY_EXISTS
├── ResourceExhausted    RESOURCE_EXHAUSTED
│   └── StorageFull          RESOURCE_EXHAUSTED  STORAGE_FULL          (also a StorageFault)
├── OutOfRange           OUT_OF_RANGE
├── Unauthenticated      UNAUTHENTICATED
└── Unavailable          UNAVAILABLE
    ├── ShuttingDown         UNAVAILABLE         SHUTTING_DOWN         (this server drains)
    ├── DatabaseUnavailable  UNAVAILABLE         DATABASE_UNAVAILABLE  (also a StorageFault)
    └── StorageIOError       UNAVAILABLE         STORAGE_IO_ERROR      (also a StorageFault)

``StorageFault`` marks the faults of where jobs and the catalog are kept: the thin translation
at the database boundary (``server.store.Database.run`` for SQLite, ``server.pgstore`` for
PostgreSQL) raises them instead of the driver's exceptions, so that the core can tell "the
disk is full" or "the database is down" from a bug, and the caller gets a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "DatabaseUnavailable",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "IoTimeout",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ScanJobsError",
    "ShuttingDown",
    "StorageFault",
    "StorageFull",
    "StorageIOError",
    "Unauthenticated",
    "Unavailable",
]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: ``field`` is its name, ``description`` what is wrong."""

    field: str
    description: str


class ScanJobsError(Exception):
    """Base of every expected error.

    Attributes:
        reason: UPPER_SNAKE identifier clients branch on (sent as ``google.rpc.ErrorInfo``).
        message: human-readable text, safe to show to the caller.
    """

    reason: ClassVar[str] = "SCANJOBS_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason  # type: ignore[misc]


class InvalidArgument(ScanJobsError):
    """The caller's input is malformed; ``violations`` name the fields."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str = "", reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.violations: tuple[FieldViolation, ...] = (
            (FieldViolation(field, message),) if field else ()
        )


class PermissionDenied(ScanJobsError):
    """The path lies outside every allowed root."""

    reason = "PATH_OUTSIDE_ROOTS"


class NotFound(ScanJobsError):
    """A job or path does not exist."""

    reason = "NOT_FOUND"


class FailedPrecondition(ScanJobsError):
    """The request is well-formed but the system is not in a state that allows it."""

    reason = "FAILED_PRECONDITION"


class AlreadyExists(ScanJobsError):
    """A request id was reused for a different request."""

    reason = "ALREADY_EXISTS"


class ResourceExhausted(ScanJobsError):
    """A configured limit is reached."""

    reason = "RESOURCE_EXHAUSTED"


class OutOfRange(ScanJobsError):
    """A position (a sequence) outside what the server keeps."""

    reason = "OUT_OF_RANGE"


class Unauthenticated(ScanJobsError):
    """The call carries no valid credentials."""

    reason = "UNAUTHENTICATED"


class Unavailable(ScanJobsError):
    """The service cannot answer now; retry elsewhere or later."""

    reason = "UNAVAILABLE"


class ShuttingDown(Unavailable):
    """This server is shutting down; another replica, or this one restarted, will answer."""

    reason = "SHUTTING_DOWN"


class IoTimeout(Unavailable):
    """A filesystem operation did not answer within ``--io-timeout``: a share that is down
    or a disk that hangs. Retry once it answers again."""

    reason = "IO_TIMEOUT"


class StorageFault(ScanJobsError):
    """Where jobs and the catalog are kept cannot take the request now; a retry later may
    succeed without a restart. Mixed into each concrete fault below."""

    reason = "STORAGE_FAULT"


class StorageFull(StorageFault, ResourceExhausted):
    """The data directory's file system is out of space: writes fail, reads still work."""

    reason = "STORAGE_FULL"


class DatabaseUnavailable(StorageFault, Unavailable):
    """The database (PostgreSQL) cannot be reached."""

    reason = "DATABASE_UNAVAILABLE"


class StorageIOError(StorageFault, Unavailable):
    """The SQLite database cannot be read or written: a read-only, failing or vanished data
    directory."""

    reason = "STORAGE_IO_ERROR"
