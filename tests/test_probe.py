"""PyAV probes on generated media, and the worker pool under crashes, hangs and cancels."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from scanjobs.server.probe import MediaInfo, ProbeFailure, ProbePool, ProbeTarget, probe_file
from tests.conftest import MISBEHAVING_WORKER, eventually
from tests.conftest import probing as is_probing
from tests.media import write_video


def target(path: Path | bytes) -> ProbeTarget:
    st = os.stat(path)
    return ProbeTarget(os.fsencode(path), st.st_dev, st.st_ino)


def test_h264_aac_mp4_metadata(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4", size=(64, 48), fps=25, frames=10)
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert info.container == "mov,mp4,m4a,3gp,3g2,mj2"
    assert (info.video_codec, info.width, info.height) == ("h264", 64, 48)
    assert info.frame_rate == Fraction(25)
    assert (info.audio_codec, info.audio_streams) == ("aac", 1)
    assert (info.subtitle_streams, info.data_streams) == (0, 0)
    assert info.duration_s is not None and 0.35 < info.duration_s < 0.5
    assert info.bit_rate > 0


def test_mkv_with_subtitles(tmp_path: Path) -> None:
    path = write_video(tmp_path / "b.mkv", container="matroska", subtitles=True, fps=30)
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert info.container == "matroska,webm"
    assert info.subtitle_streams == 1
    assert info.frame_rate == Fraction(30)


def test_vp9_webm_and_audioless_mov(tmp_path: Path) -> None:
    webm = probe_file(target(write_video(tmp_path / "c.webm", codec="libvpx-vp9", audio="libopus")))
    mov = probe_file(target(write_video(tmp_path / "d.mov", audio=None, size=(32, 16))))
    assert isinstance(webm, MediaInfo) and isinstance(mov, MediaInfo)
    assert (webm.video_codec, webm.audio_codec) == ("vp9", "opus")
    assert (mov.audio_codec, mov.audio_streams, mov.width, mov.height) == ("", 0, 32, 16)


def test_ntsc_frame_rate_is_kept_as_a_rational(tmp_path: Path) -> None:
    path = tmp_path / "ntsc.mp4"
    write_video(path, fps=30, frames=5)
    # 30000/1001 needs a rational time base; write it through PyAV directly.
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame(32, 32, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.pts = i
            frame.time_base = Fraction(1001, 30000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert info.frame_rate == Fraction(30000, 1001)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 100, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100],
    ids=["empty", "garbage", "truncated-header"],
)
def test_corrupt_files_are_failures_not_exceptions(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    outcome = probe_file(target(path))
    assert isinstance(outcome, ProbeFailure)
    assert outcome.message


def test_truncated_video_is_a_failure(tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(good[: len(good) // 3])
    assert isinstance(probe_file(target(path)), ProbeFailure)


def test_non_utf8_name_is_probed(tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.mp4")
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.mp4")
    os.rename(good, odd)
    assert isinstance(probe_file(target(odd)), MediaInfo)


def test_a_file_swapped_after_the_walk_is_refused(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4")
    seen = target(path)
    path.unlink()
    os.mkfifo(path)  # a FIFO would block a plain open(); this one must not
    outcome = probe_file(seen)
    assert isinstance(outcome, ProbeFailure)
    assert "changed" in outcome.message


def test_a_vanished_file_is_a_failure(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4")
    seen = target(path)
    path.unlink()
    outcome = probe_file(seen)
    assert outcome == ProbeFailure("file disappeared before it was probed")


def test_playlist_content_in_a_video_name_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.mp4"
    write_video(secret)
    # A playlist names other files; the probe must never open them, whatever the name says.
    playlist = tmp_path / "evil.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{secret}\n#EXT-X-ENDLIST\n"
    )
    assert isinstance(probe_file(target(playlist)), ProbeFailure)


@pytest.fixture
async def pool() -> AsyncIterator[ProbePool]:
    # A generous limit: on a busy machine a real probe may take seconds. The test that
    # wants a timeout has its own pool.
    p = ProbePool(2, probe_timeout_s=60.0, command=MISBEHAVING_WORKER)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def impatient_pool() -> AsyncIterator[ProbePool]:
    p = ProbePool(2, probe_timeout_s=1.0, command=MISBEHAVING_WORKER)
    await p.start()
    yield p
    await p.close()


async def _until_idle(pool: ProbePool) -> None:
    await eventually(lambda: pool.background_tasks == 0, "the replacement worker started")


async def test_pool_probes_a_batch_in_order(pool: ProbePool, tmp_path: Path) -> None:
    a = write_video(tmp_path / "a.mp4")
    b = write_video(tmp_path / "b.mkv", container="matroska")
    (tmp_path / "c.mp4").write_bytes(b"junk")
    outcomes = await pool.probe([target(a), target(b), target(tmp_path / "c.mp4")])
    assert [type(o) for o in outcomes] == [MediaInfo, MediaInfo, ProbeFailure]


async def test_a_file_that_crashes_its_worker_costs_one_failure(
    pool: ProbePool, tmp_path: Path
) -> None:
    good = write_video(tmp_path / "a.mp4")
    crash = tmp_path / "crash.mp4"
    crash.write_bytes(good.read_bytes())
    after = tmp_path / "b.mp4"
    after.write_bytes(good.read_bytes())

    outcomes = await pool.probe([target(good), target(crash), target(after)])

    assert isinstance(outcomes[0], MediaInfo)
    assert outcomes[1] == ProbeFailure("the file crashed the probe worker")
    assert isinstance(outcomes[2], MediaInfo)
    await _until_idle(pool)
    assert len(await pool.probe([target(good)] * 4)) == 4


async def test_a_file_that_hangs_is_a_timeout_failure(
    impatient_pool: ProbePool, tmp_path: Path
) -> None:
    hang = tmp_path / "hang.mp4"
    hang.write_bytes(b"x")
    outcomes = await impatient_pool.probe([target(hang)])
    assert outcomes == [ProbeFailure("probe took longer than 1 s")]
    await _until_idle(impatient_pool)


async def test_cancel_kills_the_worker_instead_of_waiting(pool: ProbePool, tmp_path: Path) -> None:
    hang = tmp_path / "hang.mp4"
    hang.write_bytes(b"x")
    probing = asyncio.create_task(pool.probe([target(hang)]))
    await eventually(lambda: is_probing(hang), "the hanging file is inside a worker")
    pids_before = {w.proc.pid for w in pool._all}

    probing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probing
    await _until_idle(pool)

    pids_after = {w.proc.pid for w in pool._all}
    assert len(pids_after) == 2
    assert len(pids_before - pids_after) == 1


def test_a_file_whose_name_lies_is_still_described(tmp_path: Path) -> None:
    # A Matroska file named .mp4: the demuxer the name suggests fails, detection finds it.
    path = write_video(tmp_path / "really-mkv.mp4", container="matroska", subtitles=True)
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert (info.container, info.subtitle_streams) == ("matroska,webm", 1)
