"""Opening beneath a folder's descriptor, with openat2 and with its per-component fallback."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanjobs.server import fsopen


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[int]:
    """root/{a/b/file.mp4, inside -> a/b/file.mp4, up -> ../outside.mp4, dirlink -> a, ...}."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file.mp4").write_bytes(b"inside")
    (tmp_path / "outside.mp4").write_bytes(b"outside")
    (root / "inside.mp4").symlink_to("a/b/file.mp4")
    (root / "a" / "b" / "back.mp4").symlink_to("../../inside.mp4")
    (root / "up.mp4").symlink_to("../outside.mp4")
    (root / "absolute.mp4").symlink_to(tmp_path / "outside.mp4")
    (root / "dirlink").symlink_to("a", target_is_directory=True)
    (root / "loop.mp4").symlink_to("loop.mp4")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _read(root_fd: int, path: bytes, **kw: bool) -> bytes:
    fd = fsopen.open_beneath(root_fd, path, os.O_RDONLY, **kw)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _errno(root_fd: int, path: bytes, **kw: bool) -> int:
    with pytest.raises(OSError) as caught:
        os.close(fsopen.open_beneath(root_fd, path, os.O_RDONLY, **kw))
    return caught.value.errno


def test_a_symlink_free_path_opens(resolver: str, tree: int) -> None:
    assert _read(tree, b"a/b/file.mp4") == b"inside"
    assert _read(tree, b"a/./b//file.mp4") == b"inside"


def test_any_symlink_on_the_way_is_refused_without_following(resolver: str, tree: int) -> None:
    assert _errno(tree, b"inside.mp4") == errno.ELOOP
    assert _errno(tree, b"dirlink/b/file.mp4") == errno.ELOOP


def test_climbing_out_or_an_absolute_path_is_refused(resolver: str, tree: int) -> None:
    assert _errno(tree, b"../outside.mp4") == errno.EXDEV
    assert _errno(tree, b"a/../../outside.mp4") == errno.EXDEV
    assert _errno(tree, b"/etc/hostname") == errno.EXDEV


def test_symlinks_that_stay_beneath_are_followed_when_asked(resolver: str, tree: int) -> None:
    assert _read(tree, b"inside.mp4", follow_symlinks=True) == b"inside"
    assert _read(tree, b"a/b/back.mp4", follow_symlinks=True) == b"inside"
    assert _read(tree, b"dirlink/b/file.mp4", follow_symlinks=True) == b"inside"


def test_symlinks_that_leave_are_refused_even_when_followed(resolver: str, tree: int) -> None:
    assert _errno(tree, b"up.mp4", follow_symlinks=True) == errno.EXDEV
    assert _errno(tree, b"absolute.mp4", follow_symlinks=True) == errno.EXDEV
    assert _errno(tree, b"loop.mp4", follow_symlinks=True) == errno.ELOOP


def test_real_path_names_what_a_descriptor_is(tree: int) -> None:
    fd = fsopen.open_beneath(tree, b"a/b", os.O_PATH | os.O_DIRECTORY)
    try:
        assert fsopen.real_path(fd).endswith(b"/root/a/b")
    finally:
        os.close(fd)
