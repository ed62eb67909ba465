"""Hold the server's opens of chosen folders until the test has acted: a kernel gate.

fanotify permission events (``FAN_OPEN_PERM``) make an ``open`` of a marked folder wait
until a listener allows it. A race test marks the folders a scan will open, is told which
one the walk opens first (whatever order the file system lists them in), changes the tree
while that open waits, then lets it go: the race happens on purpose, every time. Needs root
(``CAP_SYS_ADMIN``), as the tests run.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_FAN_CLASS_CONTENT = 0x04
_FAN_CLOEXEC = 0x01
_FAN_MARK_ADD = 0x01
_FAN_OPEN_PERM = 0x10000
_FAN_ONDIR = 0x40000000
_FAN_ALLOW = 0x01
_AT_FDCWD = -100
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("iI")  # struct fanotify_response


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = (
        ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p,
    )  # fmt: skip
    return libc


@contextmanager
def first_open_of(folders: list[Path], act: Callable[[Path], None]) -> Iterator[threading.Event]:
    """Gate opens of ``folders``: the first one opened waits while ``act(that folder)`` runs.

    Every later open is allowed at once. Yields an event set once ``act`` has run.
    """
    libc = _libc()
    fan = libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY)
    if fan < 0:
        raise OSError(ctypes.get_errno(), "fanotify_init")
    for folder in folders:
        if libc.fanotify_mark(fan, _FAN_MARK_ADD, _FAN_OPEN_PERM | _FAN_ONDIR, _AT_FDCWD,
                              os.fsencode(folder)) != 0:  # fmt: skip
            raise OSError(ctypes.get_errno(), f"fanotify_mark {folder}")
    acted, stop = threading.Event(), threading.Event()

    def listen() -> None:
        while not stop.is_set():
            if not select.select([fan], [], [], 0.05)[0]:
                continue
            data, offset = os.read(fan, 4096), 0
            while offset < len(data):
                length, *_, fd, _pid = _EVENT.unpack_from(data, offset)
                offset += length
                opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
                try:
                    if not acted.is_set():
                        act(opened)
                        acted.set()
                finally:
                    os.write(fan, _RESPONSE.pack(fd, _FAN_ALLOW))
                    os.close(fd)

    listener = threading.Thread(target=listen, name="open-gate", daemon=True)
    listener.start()
    try:
        yield acted
    finally:
        stop.set()
        listener.join()
        os.close(fan)  # allows anything still waiting
