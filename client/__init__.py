"""The scanjobs client: a typed async library (:class:`ScanClient`) and the ``scanjobs`` CLI."""

from .api import TERMINAL_STATES, ScanClient, TlsFiles, is_terminal
from .errors import (
    InvalidRequest,
    NotAllowed,
    NotFound,
    ScanClientError,
    ServiceUnavailable,
)

__all__ = [
    "TERMINAL_STATES",
    "InvalidRequest",
    "NotAllowed",
    "NotFound",
    "ScanClient",
    "ScanClientError",
    "ServiceUnavailable",
    "TlsFiles",
    "is_terminal",
]
