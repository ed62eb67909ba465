"""The walk: list a folder tree by descriptor, never led out of its root by a symlink.

Each folder is opened beneath the root's descriptor, by its symlink-free path, without
following any symlink (:func:`server.fsopen.open_beneath`), and listed through that
descriptor. A folder swapped for a symlink after its parent was listed is an error for that
folder, never a way out. Only one folder is open at a time, however wide or deep the tree:
pending folders wait as names, not descriptors.

:meth:`Tree.list` lists one folder completely and says whether it could (what reconciling a
folder with the catalog needs); :func:`listings` streams the listing of every folder below
one, :func:`walk` their items.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from .catalog import FileStamp
from .fsopen import open_beneath, real_path
from .probe import ProbeTarget
from .roots import Folder, RootPolicy

__all__ = [
    "OUTSIDE_ROOTS",
    "Candidate",
    "Listing",
    "Stamp",
    "Tree",
    "WalkError",
    "WalkItem",
    "listings",
    "walk",
]

OUTSIDE_ROOTS = "symlink points outside the allowed roots"
_ENCODING, _ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SLOW_STAT_S = 0.0005  # a local stat takes microseconds; a network share's, milliseconds
# Slow stats in a row that make a folder's stats go in flight: on a busy machine one stat now
# and then waits for the CPU; on a network share every one is slow.
_SLOW_STATS = 2
_TIMED_ALONE, _TIMED_GROUP = 8, 16  # files timed one by one at a folder's start; then per group


class Candidate(NamedTuple):
    """A regular file with a video extension, as the walk saw it (a tuple: the walk makes
    one per file, and a rescan is mostly this).

    ``path`` is the name the catalog keeps; ``root`` and ``relative`` say where the probe
    opens it: the symlink-free place of the file (of a followed symlink's target) beneath
    an allowed root.
    """

    path: bytes
    size_bytes: int
    mtime_ns: int
    device: int
    inode: int
    root: bytes
    relative: bytes

    @property
    def stamp(self) -> FileStamp:
        """Size and mtime, compared with the catalog's."""
        return _new(FileStamp, (self.size_bytes, self.mtime_ns))

    @property
    def target(self) -> ProbeTarget:
        """What the probe worker opens and verifies."""
        return ProbeTarget(self.root, self.relative, self.device, self.inode)


@dataclass(frozen=True, slots=True)
class WalkError:
    """Something the walk could not read: a per-file error, not a job failure."""

    path: bytes
    message: str


_new = tuple.__new__
_FORMAT, _REGULAR = 0o170000, stat.S_IFREG  # stat.S_ISREG, without a call per file
WalkItem = Candidate | WalkError
Stamp = tuple[bytes, int, int, int, int]
"""A regular file as its folder's listing keeps it: path, size, mtime, device and inode. Its
:class:`Candidate` is made only when the folder is compared; a settled folder needs none."""
_Listed = Candidate | WalkError | Stamp
_Entries = list[os.DirEntry[str] | WalkError]  # a folder's entries with a video name, in order


@dataclass(slots=True)
class Listing:
    """One folder, as listed through its descriptor.

    Attributes:
        path: the folder, as the catalog names its files.
        items: its video files (a :data:`Stamp`; a :class:`Candidate` for a followed
            symlink, or for a file stated in flight on slow storage) and per-entry errors, in
            listing order.
        folders: its sub-folders, relative to the walk's folder.
        complete: True only if the folder was opened and read to its end; what is missing
            from an incomplete listing may still exist.
        device: the device the folder is on (``st_dev``): an empty mount point is on another
            device than the videos catalogued below it.
        entries: how many entries of any kind it holds.
        unreadable: how many of ``items`` are entries that could not be read.
        candidates: how many of ``items`` are already a :class:`Candidate`.
        root, under: where its files lie beneath an allowed root (``under`` ends with a
            slash, or is empty for the root itself).
    """

    path: bytes
    items: list[_Listed] = field(default_factory=list)
    folders: list[bytes] = field(default_factory=list)
    complete: bool = False
    device: int = 0
    entries: int = 0
    unreadable: int = 0
    candidates: int = 0
    root: bytes = b""
    under: bytes = b""

    @property
    def files(self) -> list[Candidate]:
        """Its video files (a new list each time: read it once)."""
        make = self._candidate
        return [make(i) for i in self.entry_items() if not isinstance(i, WalkError)]

    def stamps(self) -> list[Stamp]:
        """Its video files as stamps, in listing order (a new list each time): what a digest
        of the folder covers, without a :class:`Candidate` made."""
        items = self.entry_items()
        if not self.unreadable and not self.candidates:  # most folders: only stamps
            return cast(list[Stamp], items[:])
        return [i[:5] for i in items if not isinstance(i, WalkError)]

    def walk_items(self) -> list[WalkItem]:
        """Its items, every file as a :class:`Candidate`, and the folder's own error last."""
        make = self._candidate
        return [i if isinstance(i, WalkError) else make(i) for i in self.items]

    def _candidate(self, item: Candidate | Stamp) -> Candidate:
        if type(item) is Candidate:
            return item
        name = item[0][len(self.path) + 1 :]
        return _new(Candidate, (*item, self.root, self.under + name))

    @property
    def errors(self) -> list[WalkError]:
        """Its entries that could not be read, not the folder's own error (a new list each
        time: read it once)."""
        if not self.unreadable:
            return []
        return [i for i in self.entry_items() if type(i) is WalkError]

    @property
    def error(self) -> WalkError | None:
        """Why the folder itself could not be read (completely), if it could not: the last
        item of an incomplete listing."""
        last = self.items[-1] if self.items and not self.complete else None
        return last if isinstance(last, WalkError) else None

    def entry_items(self) -> list[_Listed]:
        """Its items without the folder's own error."""
        return self.items if self.complete else self.items[:-1]

    @property
    def subdirs(self) -> list[bytes]:
        """Its sub-folders, as the catalog names them."""
        prefix = self.path + b"/"
        return [prefix + f.rpartition(b"/")[2] for f in self.folders]


class Tree:
    """Lists the folders below one scan folder, each by descriptor beneath its root.

    Use as a context manager: it holds the root's descriptor (``O_PATH``) while open.

    Args:
        folder: the scan folder, as :meth:`RootPolicy.locate` found it.
        extensions: lower-case extensions, with the dot, that mark a video.
        roots: where a file symlink may lead.
        stats: a thread pool: a folder whose first ``stat`` calls are slow (network
            storage) has the rest of its files stated in flight on it; on a local disk every
            ``stat`` stays on the calling thread, where it is cheapest.
    """

    def __init__(
        self,
        folder: Folder,
        extensions: frozenset[bytes],
        roots: RootPolicy,
        *,
        stats: Executor | None = None,
    ) -> None:
        self._folder = folder
        self._suffixes = tuple(os.fsdecode(e) for e in extensions)
        self._roots = roots
        self._root_fd = -1
        self._stats = stats
        self.ops = 0  # filesystem calls answered so far: how a watchdog tells slow from stuck

    def __enter__(self) -> Tree:
        self._root_fd = os.open(self._folder.root, _ROOT_FLAGS)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._root_fd)
        self._root_fd = -1

    def path_of(self, relative: bytes) -> bytes:
        """The folder ``relative`` (to the scan folder), as the catalog names its files."""
        return self._folder.path + b"/" + relative if relative else self._folder.path

    def list(self, relative: bytes = b"") -> Listing:
        """List the folder ``relative`` (to the scan folder; ``b""`` for itself)."""
        folder = self._folder
        path = self.path_of(relative)
        beneath = (folder.relative + b"/" + relative if folder.relative else relative) or b"."
        listing = Listing(path, root=folder.root)
        try:
            fd = open_beneath(self._root_fd, beneath, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            listing.items.append(WalkError(path, _unreadable_folder(exc)))
            return listing
        try:
            listing.device = os.fstat(fd).st_dev
            self._read(fd, listing, relative, beneath)
            listing.complete = True
        except OSError as exc:
            listing.items.append(WalkError(path, _unreadable_folder(exc)))
        finally:
            os.close(fd)
        return listing

    def _read(self, fd: int, listing: Listing, relative: bytes, beneath: bytes) -> None:
        entries = self._names(fd, listing, relative)
        under = listing.under = beneath + b"/" if beneath != b"." else b""
        prefix = listing.path + b"/"
        done = self._stat_here(entries, fd, prefix, under, listing)
        if done < len(entries):  # slow storage: the rest in flight
            self._stat_in_flight(entries[done:], fd, prefix, under, listing)

    def _names(self, fd: int, listing: Listing, relative: bytes) -> _Entries:
        """The folder's entries: its sub-folders into ``listing``; those with a video name,
        and the ones that could not be read, returned, in listing order."""
        folders, suffixes = listing.folders, self._suffixes
        found: _Entries = []
        sub = relative + b"/" if relative else b""
        count = 0
        with os.scandir(fd) as entries:  # names are str here: they are encoded back once
            for entry in entries:  # the hot loop: one cheap test per entry, then go on
                count += 1
                self.ops += 1
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(sub + entry.name.encode(_ENCODING, _ERRORS))
                        continue
                except OSError as exc:
                    name = listing.path + b"/" + entry.name.encode(_ENCODING, _ERRORS)
                    found.append(WalkError(name, f"cannot read: {exc.strerror}"))
                    continue
                if entry.name.lower().endswith(suffixes):
                    found.append(entry)
        listing.entries = count
        return found

    def _stat_here(
        self, entries: _Entries, fd: int, prefix: bytes, under: bytes, listing: Listing
    ) -> int:
        """Stat ``entries`` on this thread, in order, until storage proves slow (with a pool
        to take the rest); returns how many were done."""
        items, ops = listing.items, self.ops
        slow, perf = 0, time.perf_counter
        # The clock is read after each of the first files (each one's own time), then after
        # each group of them: a local disk is known by then, and a clock read is not free.
        check = 1 if self._stats is not None else len(entries) + 1
        last, counted = perf(), 0
        for done, entry in enumerate(entries, 1):
            st = None
            if not isinstance(entry, WalkError):
                try:  # a symlink is not regular here: _unusual looks where it leads
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    st = None  # the error is made by _unusual
            if st is not None and st.st_mode & _FORMAT == _REGULAR:  # the usual: inline
                name = entry.name.encode(_ENCODING, _ERRORS)  # type: ignore[union-attr]
                items.append((prefix + name, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
            else:
                self._add(self._unusual(entry, fd, prefix, under), listing)
            self.ops = ops + done
            if done >= check:  # judged by the files stated since the last clock read
                now = perf()
                slow = slow + 1 if now - last > (done - counted) * _SLOW_STAT_S else 0
                last, counted = now, done
                if slow >= _SLOW_STATS:
                    return done
                check = done + (1 if done < _TIMED_ALONE else _TIMED_GROUP)
        return len(entries)

    def _stat_in_flight(
        self, entries: _Entries, fd: int, prefix: bytes, under: bytes, listing: Listing
    ) -> None:
        """Stat ``entries`` on the pool, all at once (storage proved slow), in listing order."""
        pool, unusual = self._stats, self._unusual
        if pool is None:
            return
        pending = [pool.submit(unusual, e, fd, prefix, under) for e in entries]
        for future in pending:
            self._add(future.result(), listing)
            self.ops += 1

    @staticmethod
    def _add(item: WalkItem | None, listing: Listing) -> None:
        if item is not None:
            listing.items.append(item)
            listing.unreadable += type(item) is WalkError
            listing.candidates += type(item) is Candidate

    def _unusual(
        self, entry: os.DirEntry[str] | WalkError, fd: int, prefix: bytes, under: bytes
    ) -> WalkItem | None:
        """What an entry that is not plainly a regular file is (or already was)."""
        return entry if isinstance(entry, WalkError) else self._candidate(entry, fd, prefix, under)

    def _candidate(
        self, entry: os.DirEntry[str], fd: int, prefix: bytes, under: bytes
    ) -> WalkItem | None:
        """A file with a video name: a candidate if it is a regular file we may read."""
        name = entry.name.encode(_ENCODING, _ERRORS)
        path = prefix + name
        try:
            if entry.is_symlink():
                return self._followed(path, os.readlink(name, dir_fd=fd), under)
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            return WalkError(path, f"cannot read: {exc.strerror}")
        if st.st_mode & _FORMAT != _REGULAR:
            return None
        fields = (path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, self._folder.root)
        return _new(Candidate, (*fields, under + name))  # a tuple's own constructor: cheaper

    def _followed(self, path: bytes, target: bytes, under: bytes) -> WalkItem | None:
        """A file symlink, followed only if no step of its resolution leaves the roots.

        Every other link gets the same error whether or not its target exists, so that the
        outcome says nothing about what lies outside the roots.
        """
        if target.startswith(b"/"):
            where = self._roots.link_target(target)
        else:
            where = (self._folder.root, under + target)
        if where is None:
            return WalkError(path, OUTSIDE_ROOTS)
        root, beneath = where
        try:
            st, real = self._resolve(root, beneath)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return WalkError(path, OUTSIDE_ROOTS)
            return WalkError(path, f"cannot read: {exc.strerror}")
        inside = self._roots.root_of(real)
        if inside is None:  # cannot happen beneath a root's descriptor; refuse all the same
            return WalkError(path, OUTSIDE_ROOTS)
        if not stat.S_ISREG(st.st_mode):
            return None
        relative = real[len(inside) :].lstrip(b"/")
        return Candidate(path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, inside, relative)

    def _resolve(self, root: bytes, beneath: bytes) -> tuple[os.stat_result, bytes]:
        """Stat and name what ``beneath`` leads to, symlinks followed only beneath ``root``."""
        root_fd = self._root_fd if root == self._folder.root else os.open(root, _ROOT_FLAGS)
        try:
            fd = open_beneath(root_fd, beneath, os.O_PATH, follow_symlinks=True)
        finally:
            if root_fd != self._root_fd:
                os.close(root_fd)
        try:
            return os.fstat(fd), real_path(fd)
        finally:
            os.close(fd)


def _unreadable_folder(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return "cannot read directory: it was replaced by a symlink, which is not followed"
    return f"cannot read directory: {exc.strerror}"


def listings(
    folder: Folder,
    *,
    recursive: bool,
    extensions: frozenset[bytes],
    roots: RootPolicy,
    stop: threading.Event | None = None,
) -> Iterator[Listing]:
    """Yield the listing of ``folder`` and (if ``recursive``) of every folder below it, without
    following folder symlinks.

    A file symlink is followed only when no step of its resolution leaves the roots. FIFOs,
    sockets and devices are skipped without being opened. Memory holds one folder's listing
    and the names of the folders still to list.
    """
    with Tree(folder, extensions, roots) as tree:
        pending = [b""]
        while pending:
            if stop is not None and stop.is_set():
                return
            listing = tree.list(pending.pop())
            if recursive:
                pending.extend(reversed(listing.folders))  # listed in listing order
            yield listing


def walk(
    folder: Folder,
    *,
    recursive: bool,
    extensions: frozenset[bytes],
    roots: RootPolicy,
    stop: threading.Event | None = None,
) -> Iterator[WalkItem]:
    """Yield the video files (and per-entry errors) below ``folder``, folder by folder; see
    :func:`listings`."""
    for listing in listings(
        folder, recursive=recursive, extensions=extensions, roots=roots, stop=stop
    ):
        yield from listing.walk_items()
