"""Generated media libraries for the benchmarks and the demo: small real videos of mixed
containers and codecs, a few corrupt files, nested folders. Nothing binary is committed."""

from __future__ import annotations

import shutil
from pathlib import Path

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
