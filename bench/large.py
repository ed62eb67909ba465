"""``python -m bench.large PATH``: write one real AVI of at least 200 MB, fast.

The frames are one encoded MPEG-4 frame followed by filler packets: muxing needs no
encoding, and FFmpeg still sees a valid file with a full index to read."""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import av

SIZE_BYTES = 210_000_000
FILLER = 4096


def write_large(path: Path) -> None:
    """Write the file (through a temporary name, so a half-written one is never kept)."""
    one = path.with_suffix(".one.avi")
    with av.open(str(one), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        frame = av.VideoFrame(320, 240, "yuv420p")
        for plane in frame.planes:
            plane.update(os.urandom(plane.buffer_size))
        frame.pts, frame.time_base = 0, Fraction(1, 25)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    partial = path.with_suffix(".partial.avi")
    with av.open(str(one)) as source, av.open(str(partial), "w") as out:
        template = source.streams.video[0]
        first = next(p for p in source.demux(template) if p.size)
        stream = out.add_stream_from_template(template)
        filler = os.urandom(FILLER)
        for n in range(SIZE_BYTES // FILLER):
            packet = av.Packet(bytes(first) if n == 0 else filler)
            packet.pts = packet.dts = n
            packet.time_base, packet.stream, packet.is_keyframe = Fraction(1, 25), stream, True
            out.mux(packet)
    one.unlink()
    partial.rename(path)


if __name__ == "__main__":
    write_large(Path(sys.argv[1]))
