"""What a filesystem call past its deadline says.

A call into a share that stopped answering blocks its thread in the kernel, for minutes or for
ever; no signal gets a thread out of some of those waits, and a process with such a thread
cannot exit. So the server never touches a requested path on a thread of its own: the root
checks run in a helper process (``server.rootcheck``), listings in the scan workers
(``server.scanworker``), and either is replaced when a call of its own is stuck past
``--io-timeout``.
"""

from __future__ import annotations

__all__ = ["no_answer"]


def no_answer(timeout_s: float) -> str:
    """The per-file (or per-folder) error of an operation past its deadline."""
    return f"no answer from the filesystem in {timeout_s:g} s; is the share down?"
