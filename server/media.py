"""What a probe is asked and what it learns: plain records shared by the server and workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["MediaInfo", "ProbeFailure", "ProbeOutcome", "ProbeTarget"]


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What a probe learns about one file. Zero / empty means unknown or absent."""

    container: str
    duration_s: float | None
    bit_rate: int
    video_codec: str
    width: int
    height: int
    frame_rate: Fraction | None
    audio_codec: str
    audio_streams: int
    subtitle_streams: int
    data_streams: int


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """A file to probe: where it lies beneath an allowed root, and the identity (device,
    inode) the walk saw for it.

    The worker opens ``relative`` beneath ``root`` without following any symlink and probes
    the file only if what it opened is that very file: a name swapped for a symlink, a FIFO
    or another file between walk and probe is refused, never read, and nothing outside the
    root is ever opened.
    """

    root: bytes
    relative: bytes
    device: int
    inode: int

    @property
    def path(self) -> bytes:
        """The file's full name."""
        return os.path.join(self.root, self.relative)


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """A file that could not be probed, and why, in words fit for a caller."""

    message: str


ProbeOutcome = MediaInfo | ProbeFailure
