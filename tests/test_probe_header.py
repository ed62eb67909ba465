"""A probe of a format whose header says it all opens no decoder, and describes the file as
a probe that decodes does; a header that leaves something out is probed again with them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import av
import pytest

from scanjobs.server import probe as probe_module
from scanjobs.server.probe import MediaInfo, probe_file
from tests.media import write_video
from tests.test_probe import target

# (file name, writer arguments): each container of the header formats, with codecs whose
# decoders FFmpeg would otherwise open (H.264 and AAC above all), odd sizes and one frame.
HEADER_FILES: list[tuple[str, dict[str, Any]]] = [
    ("h264-aac.mp4", {}),
    ("odd-size-one-frame.mp4", {"size": (66, 50), "fps": 30, "frames": 1}),
    ("h264-opus-subs.mkv", {"container": "matroska", "audio": "libopus", "subtitles": True}),
    ("vp9-opus.webm", {"codec": "libvpx-vp9", "audio": "libopus"}),
    ("hevc-flac.mkv", {"container": "matroska", "codec": "libx265", "audio": "flac"}),
    ("ffv1-flac.mkv", {"container": "matroska", "codec": "ffv1", "audio": "flac"}),
    ("h264-ac3.mov", {"audio": "ac3", "fps": 24}),
    ("av1-opus.mp4", {"codec": "libsvtav1", "audio": "libopus"}),
    ("h264-mp3.avi", {"container": "avi", "audio": "libmp3lame"}),
    ("msmpeg4-ac3.avi", {"container": "avi", "codec": "msmpeg4v2", "audio": "ac3"}),
    ("wmv2-ac3.wmv", {"container": "asf", "codec": "wmv2", "audio": "ac3"}),
    ("h264-aac.3gp", {"container": "3gp", "size": (176, 144)}),
]


def decoded(path: Path) -> MediaInfo:
    """The description FFmpeg gives when its stream-info pass may decode (its default)."""
    expected = probe_module._FORMAT_BY_SUFFIX[path.suffix.encode()]
    with av.open(str(path), format=expected.split(",")[0]) as container:
        return probe_module._describe(container, expected)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The options of every ``av.open`` of a probe, in order."""
    seen: list[dict[str, str]] = []
    real = av.open

    def recording(*args: Any, **kwargs: Any) -> Any:
        if str(args[0]).startswith("/proc/self/fd/"):
            seen.append(dict(kwargs.get("options") or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(av, "open", recording)
    return seen


@pytest.mark.parametrize(("name", "args"), HEADER_FILES, ids=[n for n, _ in HEADER_FILES])
def test_a_header_format_is_described_without_decoding_as_with_it(
    tmp_path: Path, name: str, args: dict[str, Any], opens: list[dict[str, str]]
) -> None:
    path = write_video(tmp_path / name, **args)
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert opens == [probe_module.NO_DECODER]  # one open, and no decoder let in
    assert info == decoded(path)
    assert info.width > 0 and info.height > 0 and info.frame_rate and info.duration_s


def test_a_header_that_leaves_the_size_out_is_probed_again_with_decoders(
    tmp_path: Path, opens: list[dict[str, str]]
) -> None:
    # MPEG-4 Part 2 in MP4: the size is in the bitstream's header, which only a decoder reads.
    path = write_video(tmp_path / "divx.m4v", container="mp4", codec="mpeg4")
    info = probe_file(target(path))
    assert opens == [probe_module.NO_DECODER, {}]
    assert isinstance(info, MediaInfo)
    assert (info.width, info.height) == (64, 48)
    assert info == decoded(path)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("h264-aac.ts", {"container": "mpegts"}),
        ("flv1-mp3.flv", {"container": "flv", "codec": "flv", "audio": "libmp3lame"}),
    ],
    ids=["mpegts", "flv"],
)
def test_formats_that_state_sizes_in_their_packets_are_decoded(
    tmp_path: Path, name: str, args: dict[str, Any], opens: list[dict[str, str]]
) -> None:
    path = write_video(tmp_path / name, **args)
    info = probe_file(target(path))
    assert opens == [{}]
    assert isinstance(info, MediaInfo)
    assert info == decoded(path)
    assert (info.width, info.height) == (64, 48)


def test_a_header_file_whose_name_lies_is_detected_and_decoded(
    tmp_path: Path, opens: list[dict[str, str]]
) -> None:
    # An MPEG-TS named .mp4: the named demuxer refuses it, detection finds it, decoders run.
    path = write_video(tmp_path / "really-ts.mp4", container="mpegts")
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert info.container == "mpegts"
    assert (info.width, info.height) == (64, 48)
    assert opens[-1] == probe_module._OPTIONS
    assert os.path.getsize(path) > 0
