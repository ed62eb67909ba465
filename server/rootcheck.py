"""The root check of a scan request, in a helper process that a dead share may keep.

A ``stat`` on a share that stopped answering blocks its thread in the kernel, and with some
file systems (FUSE, NFS mounted ``hard``) no signal gets it out: not even the process can exit
until the share answers. So the server itself never touches a requested path. It asks a helper
process (``python -m scanjobs.server.rootcheck``), which checks each path on a thread of its
own (``RootPolicy.check``) and answers by line; :class:`RootChecks` gives up on a check at its
deadline (``--io-timeout``) with :class:`~server.errors.IoTimeout`. Once ``max_stuck`` checks
are stuck in a helper, it is killed and replaced; one that does not exit is abandoned (logged
and counted), and the server still exits on SIGTERM.

The roots themselves are resolved the same way when the server starts (:func:`resolve_roots`):
a root on a share that is down then does not keep the server from starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from . import errors
from .deadline import no_answer
from .errors import IoTimeout, ScanJobsError, Unavailable
from .reap import abandon, exited
from .roots import Folder, RootPolicy
from .spawn import Child, start

__all__ = ["ROOT_CHECK_COMMAND", "RootChecks", "resolve_roots"]

log = logging.getLogger(__name__)

ROOT_CHECK_COMMAND = (sys.executable, "-m", "scanjobs.server.rootcheck")
_ERRORS: dict[str, type[ScanJobsError]] = {
    c.__name__: c
    for c in (
        errors.InvalidArgument,
        errors.PermissionDenied,
        errors.NotFound,
        errors.FailedPrecondition,
    )
}
_MAX_LINE = 64 * 1024


class _Helper:
    """One helper process, the checks it owes, and those past their deadline."""

    def __init__(self, proc: Child) -> None:
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.late: set[int] = set()
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        """Hand each answer to its check until the helper's output ends."""
        try:
            while line := await self.stdout.readline():
                answer = json.loads(line)
                self.late.discard(answer["id"])
                future = self.pending.pop(answer["id"], None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except (ValueError, KeyError, ConnectionError):
            pass  # not ours any more: treated as ended
        self.fail(Unavailable("the filesystem check process ended; retry"))

    def fail(self, error: ScanJobsError) -> None:
        """End every check owed: with ``error``, or quietly when nobody waits any more."""
        for number, future in self.pending.items():
            if number in self.late:
                future.cancel()
            elif not future.done():
                future.set_exception(error)
        self.pending.clear()


class RootChecks:
    """Checks requested scan paths with a deadline, in a helper process.

    Args:
        roots: the allowed roots (as ``--root`` gives them).
        timeout_s: the deadline of each check (``--io-timeout``).
        max_stuck: checks that may be stuck past their deadline in one helper; past that it
            is replaced.
        command: the helper's command line, without the roots.
        on_abandon: called once for each killed helper that did not exit (metrics).
    """

    def __init__(
        self,
        roots: RootPolicy,
        timeout_s: float,
        *,
        max_stuck: int = 8,
        command: Sequence[str] = ROOT_CHECK_COMMAND,
        on_abandon: Callable[[], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        policy = {"roots": roots.given, "resolutions": roots.resolutions}
        self._command = (*command, "--policy", json.dumps(policy))
        self._max_stuck = max_stuck
        self._on_abandon = on_abandon
        self._ids = itertools.count()
        self._helper: _Helper | None = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self._reaping: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def stuck(self) -> int:
        """Checks past their deadline whose answer has not come yet (in the current helper)."""
        return len(self._helper.late) if self._helper is not None else 0

    async def start(self) -> None:
        """Start the helper now, so that the first check does not wait for it.

        Raises:
            Unavailable: the helper cannot be started.
        """
        await self._current()

    async def check(self, path: str, timeout_s: float | None = None) -> str:
        """``RootPolicy.check(path)`` in the helper: the path normalised.

        Raises:
            as :meth:`locate`.
        """
        return os.fsdecode((await self.locate(path, timeout_s)).path)

    async def locate(self, path: str, timeout_s: float | None = None) -> Folder:
        """``RootPolicy.locate(path)`` in the helper: the folder beneath its root.

        Raises:
            InvalidArgument, PermissionDenied, NotFound, FailedPrecondition: from the check.
            IoTimeout: no answer within ``timeout_s`` (default and at most: ``timeout_s`` of
                the constructor).
            Unavailable: the helper cannot be started, or ended mid-check.
        """
        deadline = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        helper = await self._current()
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        helper.pending[number] = future
        helper.stdin.write(json.dumps({"id": number, "path": path}).encode() + b"\n")
        try:
            answer = await asyncio.wait_for(asyncio.shield(future), deadline)
        except TimeoutError:
            helper.late.add(number)
            if len(helper.late) >= self._max_stuck:
                self._retire(helper, IoTimeout(f"{no_answer(deadline)} (earlier checks are stuck)"))
            raise IoTimeout(no_answer(deadline)) from None
        if "path" in answer:
            return Folder(*(os.fsencode(answer[k]) for k in ("path", "root", "relative")))
        kind = _ERRORS.get(answer.get("error", ""), errors.FailedPrecondition)
        if kind is errors.InvalidArgument:
            raise errors.InvalidArgument(
                answer["message"], field=answer.get("field", ""), reason=answer.get("reason")
            )
        raise kind(answer["message"], reason=answer.get("reason"))

    async def close(self) -> None:
        """Stop the helper (abandoned if a dead share holds it); idempotent."""
        self._closed = True
        async with self._starting:  # not while one starts
            if self._helper is not None:
                self._retire(self._helper, Unavailable("the server is shutting down"))
        await asyncio.gather(*self._reaping)

    async def _current(self) -> _Helper:
        async with self._starting:
            if self._closed:
                raise Unavailable("the server is shutting down")
            helper = self._helper
            if helper is None or helper.proc.returncode is not None or helper.reader is None \
                    or helper.reader.done():  # fmt: skip
                helper = self._helper = await self._spawn()
            return helper

    async def _spawn(self) -> _Helper:
        try:
            proc = await start(
                self._command,
                limit=_MAX_LINE,
                start_new_session=True,  # a terminal's Ctrl-C is the server's to handle
            )
        except OSError as exc:
            raise Unavailable(f"cannot start the filesystem check process: {exc}") from None
        helper = _Helper(proc)
        helper.reader = asyncio.create_task(helper.read(), name="root-check-reader")
        return helper

    def _retire(self, helper: _Helper, why: ScanJobsError) -> None:
        """Replace ``helper`` from the next check on (its checks in flight fail with ``why``);
        kill it and reap it in the background."""
        if self._helper is helper:
            self._helper = None
        helper.fail(why)
        with contextlib.suppress(ProcessLookupError):
            helper.proc.kill()
        reaping = asyncio.create_task(self._reap(helper))
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)

    async def _reap(self, helper: _Helper) -> None:
        if not await exited(helper.proc):
            abandon(helper.proc, "filesystem check process")
            if self._on_abandon is not None:
                self._on_abandon()
        if helper.reader is not None:
            helper.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await helper.reader


# -- the helper process ------------------------------------------------------------------


def _answer(roots: RootPolicy, request: dict[str, Any]) -> dict[str, Any]:
    try:
        folder = roots.locate(request["path"])
        return {
            "id": request["id"],
            "path": os.fsdecode(folder.path),
            "root": os.fsdecode(folder.root),
            "relative": os.fsdecode(folder.relative),
        }
    except ScanJobsError as exc:
        field = getattr(exc, "violations", ())
        return {
            "id": request["id"],
            "error": type(exc).__name__,
            "message": exc.message,
            "reason": exc.reason,
            "field": field[0].field if field else "",
        }


def _serve(roots: RootPolicy) -> None:
    """Answer each request line on a thread of its own: a stuck path holds up only itself."""
    lock = threading.Lock()

    def handle(request: dict[str, Any]) -> None:
        line = json.dumps(_answer(roots, request)) + "\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    for line in sys.stdin:
        threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()


async def resolve_roots(
    roots: Sequence[str],
    timeout_s: float,
    *,
    command: Sequence[str] = ROOT_CHECK_COMMAND,
    on_abandon: Callable[[], None] | None = None,
) -> RootPolicy:
    """The roots with their symlinks resolved by a helper process, within ``timeout_s``.

    A root that does not answer in time (a share that is down) is logged and kept as given.
    """
    proc = await start([*command, "--resolve", *roots], limit=_MAX_LINE)
    found: dict[str, str] = {}

    async def read() -> None:
        while len(found) < len(roots) and (line := await proc.stdout.readline()):
            answer = json.loads(line)
            found[answer["root"]] = answer["resolved"]

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout_s)
    proc.kill()
    if not await exited(proc):
        abandon(proc, "root resolution process")
        if on_abandon is not None:
            on_abandon()
    for root in roots:
        if root not in found:
            log.warning(
                "a root did not answer in %s s; it is used as given until the next start "
                "(is its share down?)",
                timeout_s,
                extra={"root": root},
            )
    return RootPolicy(roots, [found.get(root, root) for root in roots])


def _resolve(roots: Sequence[str]) -> None:
    """Print each root with its symlinks resolved, as each answers."""
    lock = threading.Lock()

    def resolve(root: str) -> None:
        line = json.dumps({"root": root, "resolved": os.path.realpath(root)}) + "\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    threads = [threading.Thread(target=resolve, args=(r,), daemon=True) for r in roots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    if sys.argv[1] == "--resolve":
        _resolve(sys.argv[2:])
    else:
        policy = json.loads(sys.argv[2])  # --policy JSON
        _serve(RootPolicy(policy["roots"], policy["resolutions"]))
