"""The root check of a scan request, in a helper process that a dead share may keep.

A ``stat`` on a share that stopped answering blocks its thread in the kernel, and with some
file systems (FUSE, NFS mounted ``hard``) no signal gets it out: not even the process can exit
until the share answers. So the server itself never touches a requested path. It asks a helper
process (``python -m scanjobs.server.rootcheck``), which checks each path on a thread of its
own (``RootPolicy.check``) and answers by line; :class:`RootChecks` gives up on a check at its
deadline (``--io-timeout``) with :class:`~server.errors.IoTimeout`. Once ``max_stuck`` checks
are stuck in a helper, it is killed and replaced; one that does not exit is abandoned (logged
and counted), and the server still exits on SIGTERM.

The roots themselves are resolved in the helper when the server starts
(:meth:`RootChecks.start`): a root on a share that is down does not keep the server from
starting; it is logged, and kept as given.
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

__all__ = ["ROOT_CHECK_COMMAND", "RootChecks"]

log = logging.getLogger(__name__)

ROOT_CHECK_COMMAND = (sys.executable, "-m", "scanjobs.server.rootcheck")
_READY = {"ready": True}  # the helper's first line: it can check from now on
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
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def read(self) -> None:
        """Hand each answer to its check until the helper's output ends."""
        try:
            while line := await self.stdout.readline():
                answer = json.loads(line)
                if answer == _READY:
                    self.ready.set_result(None)
                    continue
                self.late.discard(answer["id"])
                future = self.pending.pop(answer["id"], None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except (ValueError, KeyError, ConnectionError):
            pass  # not ours any more: treated as ended
        self.fail(Unavailable("the filesystem check process ended; retry"))

    def fail(self, error: ScanJobsError) -> None:
        """End every check owed: with ``error``, or quietly when nobody waits any more."""
        if not self.ready.done():
            self.ready.set_result(None)  # whoever waits for it finds their check ended
        for number, future in self.pending.items():
            if number in self.late:
                future.cancel()
            elif not future.done():
                future.set_exception(error)
        self.pending.clear()


class RootChecks:
    """Checks requested scan paths with a deadline, in a helper process.

    Args:
        roots: the allowed roots (as ``--root`` gives them); resolved in the helper by
            :meth:`start`.
        timeout_s: the deadline of each check (``--io-timeout``).
        max_stuck: checks that may be stuck past their deadline in one helper; past that it
            is replaced.
        command: the helper's command line, without the roots.
        on_abandon: called once for each killed helper that did not exit (metrics).
    """

    def __init__(
        self,
        roots: Sequence[str],
        timeout_s: float,
        *,
        max_stuck: int = 8,
        command: Sequence[str] = ROOT_CHECK_COMMAND,
        on_abandon: Callable[[], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._roots = tuple(roots)
        self._command = (*command, *roots)
        self.policy: RootPolicy | None = None  # known once started
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

    async def start(self) -> RootPolicy:
        """Start the helper, and resolve the roots in it: each root that does not answer
        within ``timeout_s`` (a share that is down) is logged, and kept as given until the next
        start. Returns the roots' policy, as the helper checks paths with it.

        Raises:
            Unavailable: the helper cannot be started.
        """
        await self._current()
        assert self.policy is not None  # noqa: S101
        return self.policy

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
        called = asyncio.get_running_loop().time()
        current = asyncio.ensure_future(self._current())
        try:
            # The caller's deadline counts a start of the helper too; the start goes on.
            helper = await asyncio.wait_for(asyncio.shield(current), timeout_s)
        except TimeoutError:
            current.add_done_callback(_seen)  # a failed start is the next check's to report
            raise IoTimeout(no_answer(min(timeout_s or self.timeout_s, self.timeout_s))) from None
        answer = await self._ask(helper, {"path": path}, called, timeout_s)
        if "path" in answer:
            return Folder(*(os.fsencode(answer[k]) for k in ("path", "root", "relative")))
        kind = _ERRORS.get(answer.get("error", ""), errors.FailedPrecondition)
        if kind is errors.InvalidArgument:
            raise errors.InvalidArgument(
                answer["message"], field=answer.get("field", ""), reason=answer.get("reason")
            )
        raise kind(answer["message"], reason=answer.get("reason"))

    async def _ask(
        self, helper: _Helper, request: dict[str, Any], called: float, timeout_s: float | None
    ) -> dict[str, Any]:
        """Send ``request`` to ``helper``, and wait for its answer.

        Raises:
            IoTimeout: no answer within the deadline (see :meth:`locate`).
        """
        deadline = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        loop = asyncio.get_running_loop()
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        helper.pending[number] = future
        helper.stdin.write(json.dumps({"id": number, **request}).encode() + b"\n")
        try:
            # The deadline counts from when the helper can check: its start-up (a Python
            # process importing modules, a second on a busy machine) is not the filesystem's
            # time. The caller's own deadline counts from the call.
            await asyncio.wait_for(asyncio.shield(helper.ready), timeout_s)
            left = deadline if timeout_s is None else called + timeout_s - loop.time()
            answer = await asyncio.wait_for(asyncio.shield(future), min(deadline, left))
        except TimeoutError:
            helper.late.add(number)
            if len(helper.late) >= self._max_stuck:
                self._retire(helper, IoTimeout(f"{no_answer(deadline)} (earlier checks are stuck)"))
            raise IoTimeout(no_answer(deadline)) from None
        return answer

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
        if self.policy is None:
            self.policy = await self._resolve(helper)
        helper.stdin.write(json.dumps({"policy": self.policy.resolutions}).encode() + b"\n")
        return helper

    async def _resolve(self, helper: _Helper) -> RootPolicy:
        """The roots with their symlinks resolved by ``helper``; a root that does not answer
        in time is logged and kept as given."""
        called = asyncio.get_running_loop().time()
        answers = await asyncio.gather(
            *(self._ask(helper, {"resolve": root}, called, None) for root in self._roots),
            return_exceptions=True,
        )
        resolutions = []
        for root, answer in zip(self._roots, answers, strict=True):
            if isinstance(answer, IoTimeout):
                log.warning(
                    "a root did not answer in %s s; it is used as given until the next start "
                    "(is its share down?)",
                    self.timeout_s,
                    extra={"root": root},
                )
                resolutions.append(root)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                resolutions.append(answer["resolved"])
        return RootPolicy(self._roots, resolutions)

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


def _seen(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _answer(roots: RootPolicy | None, request: dict[str, Any]) -> dict[str, Any]:
    if "resolve" in request:
        return {"id": request["id"], "resolved": os.path.realpath(request["resolve"])}
    try:
        if roots is None:
            raise Unavailable("the roots are not resolved yet")
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


def _serve(roots: Sequence[str]) -> None:
    """Answer each request line on a thread of its own: a stuck path holds up only itself.
    The roots' resolutions come first (``{"policy": [...]}``), once the server has them."""
    lock = threading.Lock()
    policy: RootPolicy | None = None

    def handle(request: dict[str, Any], policy: RootPolicy | None) -> None:
        line = json.dumps(_answer(policy, request)) + "\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    for line in sys.stdin:
        request = json.loads(line)
        if "policy" in request:
            policy = RootPolicy(roots, request["policy"])
            continue
        threading.Thread(target=handle, args=(request, policy), daemon=True).start()


if __name__ == "__main__":
    # Ready once imported: the checks' deadlines count from here.
    print(json.dumps(_READY), flush=True)
    _serve(sys.argv[1:])
