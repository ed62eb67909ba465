"""Generated media libraries for the benchmarks and the demo: small real videos of mixed
containers and codecs with a few corrupt files, a library of realistic 10 s videos, hard
links to one large file, and trees of empty files. Nothing binary is committed."""

from __future__ import annotations

import array
import math
import os
import random
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av

from tests.media import write_video

# (file name, writer arguments): one original of each kind; the corpus copies them around.
KINDS: tuple[tuple[str, dict[str, object]], ...] = (
    ("h264-aac.mp4", {}),
    ("h264-subs.mkv", {"container": "matroska", "subtitles": True}),
    ("vp9-opus.webm", {"codec": "libvpx-vp9", "audio": "libopus"}),
    ("h264-silent.mov", {"audio": None}),
    ("mpeg4.avi", {"codec": "mpeg4", "audio": None}),
    ("h264-wide.m4v", {"container": "mp4", "size": (128, 72), "fps": 30}),
)
CORRUPT_EVERY = 50  # one file in fifty is garbage with a video name


def make_corpus(root: Path, files: int, *, per_folder: int = 100) -> Path:
    """Fill ``root`` with ``files`` video files (cached: an existing complete corpus is kept)."""
    marker = root / f".complete-{files}"
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    originals = root / ".originals"
    originals.mkdir(parents=True)
    sources = [write_video(originals / name, **args) for name, args in KINDS]  # type: ignore[arg-type]
    for n in range(files):
        folder = root / f"shelf{n // per_folder:04}"
        folder.mkdir(exist_ok=True)
        if n % CORRUPT_EVERY == CORRUPT_EVERY - 1:
            (folder / f"broken{n:06}.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"?" * 500)
            continue
        source = sources[n % len(sources)]
        shutil.copyfile(source, folder / f"clip{n:06}{source.suffix}")
    shutil.rmtree(originals)
    marker.touch()
    return root


def sample_video(path: Path) -> Path:
    """One small H.264/AAC MP4 like the corpus's (cached)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path.with_suffix(".partial.mp4"), container="mp4").rename(path)
    return path


# -- realistic files -----------------------------------------------------------------------------

# (file name, video bit rate, audio tracks, subtitles): 1-3 MB for 10 s of 640x360 H.264.
REALISTIC: tuple[tuple[str, int, int, bool], ...] = (
    ("feature-a.mp4", 900_000, 1, False),
    ("feature-b.mp4", 1_400_000, 1, False),
    ("feature-c.mp4", 2_000_000, 1, False),
    ("episode-a.mkv", 800_000, 2, True),
    ("episode-b.mkv", 1_200_000, 2, True),
    ("episode-c.mkv", 1_700_000, 2, True),
)
_W, _H, _FPS, _RATE = 640, 360, 25, 48000


def make_realistic_corpus(root: Path, files: int, seconds: int, *, per_folder: int = 25) -> Path:
    """Fill ``root`` with ``files`` copies (each its own inode) of a few distinct realistic
    videos: H.264/AAC MP4s, and MKVs with two audio tracks and a subtitle stream (cached)."""
    marker = root / f".complete-{files}-{seconds}s"
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    originals = root / ".originals"
    originals.mkdir(parents=True)
    sources = [
        write_realistic(originals / name, seconds, bit_rate, tracks, subs, seed=n)
        for n, (name, bit_rate, tracks, subs) in enumerate(REALISTIC)
    ]
    for n in range(files):
        folder = root / f"season{n // per_folder:03}"
        folder.mkdir(exist_ok=True)
        source = sources[n % len(sources)]
        shutil.copyfile(source, folder / f"{source.stem}-{n:04}{source.suffix}")
    shutil.rmtree(originals)
    marker.touch()
    return root


def write_realistic(
    path: Path, seconds: int, bit_rate: int, audio_tracks: int, subtitles: bool, *, seed: int
) -> Path:
    """``seconds`` of 640x360 H.264 (a moving textured picture, a keyframe every 2 s) at
    ``bit_rate``, interleaved with ``audio_tracks`` stereo AAC tracks and, optionally, a
    SubRip stream with a cue every 2 s."""
    container = "matroska" if path.suffix == ".mkv" else "mp4"
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=_FPS, options={"preset": "veryfast", "g": "50"})
        video.width, video.height, video.pix_fmt = _W, _H, "yuv420p"
        video.bit_rate = bit_rate
        audio = [_audio_stream(out, ("eng", "fra")[k]) for k in range(audio_tracks)]
        if subtitles:
            _add_subtitles(out, path, seconds)
        _mux_pictures(out, video, audio, seconds, random.Random(seed))
    return path


def _audio_stream(out: av.container.OutputContainer, language: str) -> av.AudioStream:
    stream = out.add_stream("aac", rate=_RATE, layout="stereo")
    stream.bit_rate = 128_000
    stream.metadata["language"] = language
    return stream


def _mux_pictures(
    out: av.container.OutputContainer,
    video: av.VideoStream,
    audio: list[av.AudioStream],
    seconds: int,
    rng: random.Random,
) -> None:
    texture, chroma = rng.randbytes(_W * _H * 2), rng.randbytes(_W * _H // 2)
    tones = [_tone(220.0 * (k + 2)) for k in range(len(audio))]
    sent = 0  # audio frames of 1024 samples muxed per track so far
    for i in range(seconds * _FPS):
        frame = av.VideoFrame(_W, _H, "yuv420p")
        shift = i * 6 % (_W * _H)  # the picture pans: motion the encoder has to find
        frame.planes[0].update(texture[shift : shift + frame.planes[0].buffer_size])
        frame.planes[1].update(chroma[: frame.planes[1].buffer_size])
        frame.planes[2].update(chroma[-frame.planes[2].buffer_size :])
        frame.pts, frame.time_base = i, Fraction(1, _FPS)
        out.mux(video.encode(frame))
        while sent * 1024 < (i + 1) * _RATE // _FPS:
            for stream, tone in zip(audio, tones, strict=True):
                out.mux(stream.encode(_audio_frame(tone, sent)))
            sent += 1
    out.mux(video.encode(None))
    for stream in audio:
        out.mux(stream.encode(None))


def _tone(freq: float) -> bytes:
    """A second of a quiet sine wave as 32-bit floats, one channel."""
    return array.array(
        "f", (0.2 * math.sin(2 * math.pi * freq * t / _RATE) for t in range(_RATE))
    ).tobytes()


def _audio_frame(tone: bytes, n: int) -> av.AudioFrame:
    frame = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
    start = n * 1024 % (_RATE - 1024) * 4
    for plane in frame.planes:
        plane.update(tone[start : start + plane.buffer_size])
    frame.sample_rate, frame.pts = _RATE, n * 1024
    return frame


def _add_subtitles(out: av.container.OutputContainer, path: Path, seconds: int) -> None:
    """A SubRip stream copied from a generated .srt (no subtitle encoder needed)."""
    srt = path.with_name(path.name + ".srt")
    srt.write_text(
        "".join(
            f"{n + 1}\n00:00:{2 * n:02},000 --> 00:00:{2 * n + 1:02},500\nline {n + 1}\n\n"
            for n in range(max(1, seconds // 2))
        )
    )
    with av.open(str(srt)) as source:
        template = source.streams.subtitles[0]
        stream = out.add_stream_from_template(template)
        stream.metadata["language"] = "eng"
        for packet in source.demux(template):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    srt.unlink()


# -- large files and empty trees -----------------------------------------------------------------


def make_large_library(root: Path, files: int) -> Path:
    """Hard links to one >= 200 MB video: every probe in this tree is of a large file."""
    source = root / "original" / "large.avi"
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bench.large", str(source)], check=True)
    links = root / f"links-{files}"
    if not links.exists():
        links.mkdir()
        for n in range(files):
            os.link(source, links / f"large{n:03}.avi")
    return links


def make_empty_tree(root: Path, files: int) -> Path:
    """``files`` empty ``.txt`` files, a thousand a folder (cached)."""
    marker = root / f".complete-{files}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for n in range(files):
        folder = root / f"d{n // 1000:04}"
        if n % 1000 == 0:
            folder.mkdir()
        (folder / f"f{n:07}.txt").touch()
    marker.touch()
    return root
