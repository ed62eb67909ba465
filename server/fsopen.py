"""Open files and folders by descriptor, beneath a folder, never led out of it by a symlink.

A path checked and then opened by name can be changed in between: a folder swapped for a
symlink takes the open somewhere else. Here every open starts from a folder's descriptor
and the kernel resolves the rest beneath it: ``openat2(2)`` with ``RESOLVE_BENEATH`` refuses
any step out of that folder (``EXDEV``), and with ``RESOLVE_NO_SYMLINKS`` any symlink at all
(``ELOOP``). Where ``openat2`` is missing (Linux before 5.6, or a seccomp profile that
refuses it) the same rules are applied one component at a time with ``O_NOFOLLOW``. Either
way a race can only cost an error, never an open outside the folder.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Callable

__all__ = ["has_openat2", "open_beneath", "real_path"]

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # one number on every Linux architecture that has it (since 5.6)
_MAX_LINKS = 40  # the kernel's limit on symlinks followed in one resolution
_HOW_SIZE = 24  # sizeof(struct open_how)
_STEP = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


@functools.cache
def _syscall() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    call.argtypes = (
        ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
    )  # fmt: skip
    return call


@functools.cache
def _how(flags: int, resolve: int) -> tuple[_OpenHow, int]:
    """An ``open_how`` and its address, made once per (flags, resolve): the walk opens one
    folder after another with the same ones."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve | _RESOLVE_NO_MAGICLINKS)
    return how, ctypes.addressof(how)


def _openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    call = _syscall()
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    _, address = _how(flags, resolve)
    for _ in range(8):  # EAGAIN: a rename or mount raced the lookup; the kernel asks to retry
        fd = call(_SYS_OPENAT2, dir_fd, path, address, _HOW_SIZE)
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


# Set (to anything) in a process's environment, it resolves by components even where the
# kernel has openat2: what the test suite uses to run the server's workers on the fallback.
BY_COMPONENTS_VARIABLE = "SCANJOBS_RESOLVE_BY_COMPONENTS"


@functools.cache
def has_openat2() -> bool:
    """True if the kernel (and any seccomp profile) lets this process use ``openat2``."""
    if os.environ.get(BY_COMPONENTS_VARIABLE):
        return False
    try:
        os.close(_openat2(os.open("/", _STEP), b".", os.O_PATH, _RESOLVE_BENEATH))
    except OSError:
        return False
    return True


def open_beneath(dir_fd: int, path: bytes, flags: int, *, follow_symlinks: bool = False) -> int:
    """Open ``path`` (relative, or ``b"."``) beneath the folder ``dir_fd``.

    Every step of the resolution stays beneath ``dir_fd``: an absolute path, an absolute
    symlink, or a ``..`` that climbs out of it fails with ``EXDEV`` before anything outside
    is looked up. Without ``follow_symlinks`` any symlink on the way fails with ``ELOOP``;
    with it, symlinks that stay beneath ``dir_fd`` are followed. ``O_CLOEXEC`` is added.

    Raises:
        OSError: as ``open(2)`` would, or ``EXDEV`` / ``ELOOP`` as above.
    """
    resolve = _RESOLVE_BENEATH | (0 if follow_symlinks else _RESOLVE_NO_SYMLINKS)
    if has_openat2():
        return _openat2(dir_fd, path, flags, resolve)
    return _open_by_components(dir_fd, path, flags | os.O_CLOEXEC, follow_symlinks)


def _open_by_components(dir_fd: int, path: bytes, flags: int, follow_symlinks: bool) -> int:
    """``open_beneath`` without ``openat2``: one ``O_NOFOLLOW`` step per component."""
    if path.startswith(b"/"):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), path)
    todo = [p for p in reversed(path.split(b"/")) if p not in (b"", b".")]
    parts: list[bytes] = []  # where the resolution stands, beneath dir_fd, symlink-free
    links = 0
    while todo:
        name = todo.pop()
        if name == b"..":
            if not parts:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), path)
            parts.pop()
            continue
        if follow_symlinks:
            target = _link_target(dir_fd, parts, name)
            if target is not None:
                links += 1
                if links > _MAX_LINKS or target.startswith(b"/"):
                    code = errno.ELOOP if links > _MAX_LINKS else errno.EXDEV
                    raise OSError(code, os.strerror(code), path)
                todo.extend(p for p in reversed(target.split(b"/")) if p not in (b"", b"."))
                continue
        parts.append(name)
    if not parts:
        return os.open(".", flags, dir_fd=dir_fd)
    parent = _open_parts(dir_fd, parts[:-1])
    try:
        return _open_nofollow(parts[-1], flags, parent)
    finally:
        os.close(parent)


def _link_target(dir_fd: int, parts: list[bytes], name: bytes) -> bytes | None:
    """The target of ``parts/name`` if it is a symlink, else None."""
    parent = _open_parts(dir_fd, parts)
    try:
        if not stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            return None
        return os.readlink(name, dir_fd=parent)
    except FileNotFoundError:
        return None  # the open that follows reports it
    finally:
        os.close(parent)


def _open_parts(dir_fd: int, parts: list[bytes]) -> int:
    """An ``O_PATH`` descriptor of the symlink-free folder ``parts`` beneath ``dir_fd``."""
    fd = os.open(".", _STEP, dir_fd=dir_fd)
    for part in parts:
        try:
            child = _open_nofollow(part, _STEP, fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def _open_nofollow(name: bytes, flags: int, dir_fd: int) -> int:
    """``openat(O_NOFOLLOW)``, with openat2's ``ELOOP`` for a symlink where a folder is due."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def real_path(fd: int) -> bytes:
    """What ``fd`` really is, as the kernel names it now (``/proc/self/fd``)."""
    return os.readlink(b"/proc/self/fd/%d" % fd)
