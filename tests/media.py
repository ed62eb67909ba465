"""Tiny real media files for tests, written with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av


def write_video(
    path: Path,
    *,
    container: str | None = None,
    codec: str = "libx264",
    size: tuple[int, int] = (64, 48),
    fps: int = 25,
    frames: int = 10,
    audio: str | None = "aac",
    subtitles: bool = False,
) -> Path:
    """Write a short real video of ``frames`` frames of ``codec`` and optionally audio."""
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = "yuv420p"
        audio_stream = out.add_stream(audio, rate=48000) if audio else None
        if subtitles:
            _copy_subtitles(out, path)
        for i in range(frames):
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([i * 20 % 255]) * plane.buffer_size)
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio_stream is not None:
            for i in range(frames * 48000 // fps // 1024 + 1):
                aframe = av.AudioFrame(format="fltp", layout="mono", samples=1024)
                aframe.planes[0].update(bytes(aframe.planes[0].buffer_size))
                aframe.sample_rate = 48000
                aframe.pts = i * 1024
                out.mux(audio_stream.encode(aframe))
            out.mux(audio_stream.encode(None))
    return path


_SRT = "1\n00:00:00,000 --> 00:00:00,300\nhello\n\n"


def _copy_subtitles(out: av.container.OutputContainer, path: Path) -> None:
    """Add a SubRip stream to ``out``, copied from a tiny .srt file (no encoder needed)."""
    srt = path.with_name(path.name + ".srt")
    srt.write_text(_SRT)
    with av.open(str(srt)) as source:
        stream = out.add_stream_from_template(source.streams.subtitles[0])
        for packet in source.demux(source.streams.subtitles[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    srt.unlink()
