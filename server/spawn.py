"""Starting worker processes without stalling the event loop.

``asyncio.create_subprocess_exec`` forks and execs on the event loop's thread, and waits there
until the child has exec'd. That is a few milliseconds on a quiet machine, but when the cores
are busy (right after a cancel, when killed workers are replaced and their interpreters start
up) the child may wait tens of milliseconds for a CPU, and every RPC of the server waits with
it. :func:`start` runs the fork and exec on a thread instead, then hands the pipes to the loop;
the child's exit is watched with a pidfd (Linux 5.3), never with a thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

__all__ = ["Child", "start"]

# Children that were abandoned (killed, stuck in the kernel) stay referenced until they exit,
# so that collecting them never warns that a process is still running.
_ABANDONED: set[Child] = set()


class Child:
    """A started child process: its pid, its pipes as streams, and its exit.

    The same surface as ``asyncio.subprocess.Process`` where the workers use it.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stdout_transport: asyncio.ReadTransport,
    ) -> None:
        self._popen = popen
        self._stdout_transport = stdout_transport
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._watch()

    @property
    def returncode(self) -> int | None:
        """The exit status once the child exited (and was reaped), else None."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the child to exit; its exit status."""
        return await asyncio.shield(self._exit)

    def kill(self) -> None:
        """SIGKILL the child, unless it is already reaped (its pid may then be another's)."""
        self._popen.kill()  # a no-op once reaped

    def abandon(self) -> None:
        """Let go of a killed child that does not exit: close its pipes, and keep watching it
        so that it is reaped whenever it does exit."""
        self.stdin.close()
        self._stdout_transport.close()
        if self.returncode is None:
            _ABANDONED.add(self)

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:  # an old kernel: a thread waits instead
            waiting = loop.run_in_executor(None, self._popen.wait)
            waiting.add_done_callback(lambda _: self._exited())
            return

        def readable() -> None:
            if self._popen.poll() is not None:
                loop.remove_reader(fd)
                os.close(fd)
                self._exited()

        loop.add_reader(fd, readable)

    def _exited(self) -> None:
        _ABANDONED.discard(self)
        if not self._exit.done():
            self._exit.set_result(self._popen.returncode or 0)


async def start(
    argv: Sequence[str],
    *,
    limit: int = 2**16,
    env: Mapping[str, str] | None = None,
    start_new_session: bool = False,
    **account: Any,
) -> Child:
    """Start ``argv`` with its stdin and stdout as pipes, forked and exec'd on a thread.

    Args:
        limit: the stdout stream's buffer limit (the longest line it reads at once); asyncio's
            default by default.
        env: the child's environment; by default the server's.
        start_new_session: the child leads its own session and process group.
        account: ``user``, ``group`` and ``extra_groups``, as for ``subprocess.Popen``.

    Raises:
        OSError: the program cannot be started.
    """
    loop = asyncio.get_running_loop()
    starting = loop.run_in_executor(
        None, partial(_popen, list(argv), env, start_new_session, account)
    )
    try:
        popen: subprocess.Popen[bytes] = await asyncio.shield(starting)
    except asyncio.CancelledError:
        # The child may start all the same: it must not be left running.
        starting.add_done_callback(_kill_started)
        raise
    try:
        return await _connect(popen, limit)
    except BaseException:
        popen.kill()
        popen.wait()
        raise


def _popen(
    argv: list[str], env: Mapping[str, str] | None, new_session: bool, account: dict[str, Any]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 (our own worker commands, never user input)
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=new_session,
        **account,
    )


async def _connect(popen: subprocess.Popen[bytes], limit: int) -> Child:
    loop = asyncio.get_running_loop()
    assert popen.stdin is not None and popen.stdout is not None  # noqa: S101
    opened: list[asyncio.BaseTransport] = []
    try:
        reader = asyncio.StreamReader(limit=limit)
        stdout, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), popen.stdout
        )
        opened.append(stdout)
        # A StreamReaderProtocol gives the writer its flow control (drain); it reads nothing.
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), popen.stdin
        )
    except BaseException:
        for each in opened:
            each.close()
        popen.stdin.close()  # closing a pipe a transport already closed does nothing
        popen.stdout.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Child(popen, writer, reader, stdout)


def _kill_started(starting: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    with contextlib.suppress(BaseException):
        popen = starting.result()
        popen.kill()
        popen.wait()
        for pipe in (popen.stdin, popen.stdout):
            if pipe is not None:
                pipe.close()
