"""The video catalog seam: one record per video file, keyed by its absolute path (raw bytes).

Paths are the exact bytes the file system gave, so names that are not valid UTF-8 survive a
round trip. :class:`InMemoryCatalog` is the test double of ``server.store.SqliteCatalog``;
one contract suite runs over both.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

from .errors import InvalidArgument
from .probe import MediaInfo

__all__ = [
    "Catalog",
    "FileStamp",
    "InMemoryCatalog",
    "Seen",
    "Video",
    "VideoPage",
    "decode_page_token",
    "encode_page_token",
]


class FileStamp(NamedTuple):
    """What decides whether a file changed since it was catalogued."""

    size_bytes: int
    mtime_ns: int


class Seen(NamedTuple):
    """What the catalog knows of a file: its stamp, and when a scan last saw it."""

    stamp: FileStamp
    last_seen_ns: int


@dataclass(frozen=True, slots=True)
class Video:
    """A catalogued video; ``job_id`` is the job that last probed it (added or updated)."""

    path: bytes
    stamp: FileStamp
    info: MediaInfo
    first_seen_ns: int
    last_seen_ns: int
    job_id: str


VideoPage = tuple[list[Video], str]


class Catalog(Protocol):
    """Where scans keep what they found."""

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, Seen]:
        """What is known of those ``paths`` that are catalogued."""
        ...

    async def commit(
        self, job_id: str, probed: Sequence[Video], seen: Sequence[bytes], now_ns: int
    ) -> None:
        """In one transaction: store ``probed`` (as last probed by ``job_id``) and move the
        last-seen time of the unchanged files ``seen`` to ``now_ns``."""
        ...

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage: ...

    async def close(self) -> None: ...


def encode_page_token(path: bytes) -> str:
    """Opaque token that resumes a listing after ``path``."""
    return base64.urlsafe_b64encode(b"v1|" + path).decode().rstrip("=")


def decode_page_token(token: str) -> bytes:
    """Inverse of :func:`encode_page_token`.

    Raises:
        InvalidArgument: the token is not one this server made.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if not raw.startswith(b"v1|"):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return raw[3:]


class InMemoryCatalog:
    """A catalog in a dict: the test double of :class:`SqliteCatalog`."""

    def __init__(self) -> None:
        self._videos: dict[bytes, Video] = {}

    async def lookup(self, paths: Sequence[bytes]) -> dict[bytes, Seen]:
        videos = self._videos
        return {p: Seen(videos[p].stamp, videos[p].last_seen_ns) for p in paths if p in videos}

    async def commit(
        self, job_id: str, probed: Sequence[Video], seen: Sequence[bytes], now_ns: int
    ) -> None:
        for video in probed:
            old = self._videos.get(video.path)
            first = old.first_seen_ns if old else now_ns
            self._videos[video.path] = replace(
                video, first_seen_ns=first, last_seen_ns=now_ns, job_id=job_id
            )
        for path in seen:
            if path in self._videos:
                self._videos[path] = replace(self._videos[path], last_seen_ns=now_ns)

    async def list_videos(
        self, *, path_prefix: bytes, job_id: str, page_size: int, page_token: str
    ) -> VideoPage:
        after = decode_page_token(page_token) if page_token else None
        matching = [
            video
            for path, video in sorted(self._videos.items())
            if path.startswith(path_prefix)
            and (not job_id or video.job_id == job_id)
            and (after is None or path > after)
        ]
        page = matching[:page_size]
        more = len(matching) > page_size
        return page, encode_page_token(page[-1].path) if more else ""

    async def close(self) -> None:
        return None
