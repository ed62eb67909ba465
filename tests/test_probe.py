"""PyAV probes on generated media, and the worker pool under crashes, hangs and cancels."""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import struct
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import pytest

from scanjobs.server import probe as probe_module
from scanjobs.server import probe_wire as wire
from scanjobs.server.probe import (
    MediaInfo,
    ProbeFailure,
    ProbePool,
    ProbeTarget,
    probe_file,
)
from tests.conftest import MISBEHAVING_WORKER, eventually
from tests.conftest import probing as is_probing
from tests.media import write_video


def target(path: Path | bytes) -> ProbeTarget:
    """The file as the walk would hand it over, beneath its folder as the root."""
    st = os.stat(path)
    folder, name = os.path.split(os.fsencode(path))
    return ProbeTarget(folder, name, st.st_dev, st.st_ino)


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


def test_a_folder_swapped_for_a_symlink_before_the_probe_is_refused(
    tmp_path: Path, resolver: str
) -> None:
    # The symlink leads to the very file the walk saw (same device and inode): only opening
    # beneath the root without following symlinks refuses it.
    (tmp_path / "sub").mkdir()
    path = write_video(tmp_path / "sub" / "a.mp4")
    st = path.stat()
    seen = ProbeTarget(os.fsencode(tmp_path), b"sub/a.mp4", st.st_dev, st.st_ino)
    (tmp_path / "sub").rename(tmp_path / "elsewhere")
    (tmp_path / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    outcome = probe_file(seen)
    assert outcome == ProbeFailure("the file changed between walk and probe; it was not read")


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
    assert [type(o) for o in outcomes] == [MediaInfo, MediaInfo, ProbeFailure], outcomes


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


async def test_each_file_that_crashes_its_worker_is_the_one_failure_in_a_batch(
    pool: ProbePool, tmp_path: Path
) -> None:
    # A worker writes outcomes a few milliseconds apart: those of the files just before a
    # crash are lost with it, and must be probed again, not blamed.
    good = target(write_video(tmp_path / "a.mp4"))
    crash = tmp_path / "crash.mp4"
    crash.write_bytes(b"x")
    batch = [good] * 5 + [target(crash)] + [good] * 5 + [target(crash)] + [good]

    outcomes = await pool.probe(batch)

    failed = [i for i, o in enumerate(outcomes) if isinstance(o, ProbeFailure)]
    assert failed == [5, 11], outcomes
    assert outcomes[5] == outcomes[11] == ProbeFailure("the file crashed the probe worker")
    assert len(outcomes) == len(batch)


async def test_the_probe_time_of_each_file_is_measured_by_its_worker(tmp_path: Path) -> None:
    # Outcomes arrive together: the time between two arrivals is not a file's probe time.
    times: list[float] = []
    good = target(write_video(tmp_path / "a.mp4"))
    timed = ProbePool(1, probe_timeout_s=60.0, on_probe=times.append)
    await timed.start()
    try:
        outcomes = await timed.probe([good] * 8)
    finally:
        await timed.close()
    assert all(isinstance(o, MediaInfo) for o in outcomes)
    assert len(times) == 8 and min(times) >= 1e-4, times  # a real probe takes that at least


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


async def test_a_worker_with_threads_answers_a_batch_in_order(tmp_path: Path) -> None:
    good = write_video(tmp_path / "a.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"junk")
    batch = [target(good), target(tmp_path / "junk.mp4")] * 6
    threaded = ProbePool(1, probe_timeout_s=60.0, command=MISBEHAVING_WORKER, threads=4)
    await threaded.start()
    try:
        outcomes = await threaded.probe(batch)
    finally:
        await threaded.close()
    assert [type(o) for o in outcomes] == [MediaInfo, ProbeFailure] * 6, outcomes


async def test_outcomes_done_before_a_hanging_file_are_sent_before_it_times_out(
    tmp_path: Path,
) -> None:
    good = write_video(tmp_path / "a.mp4")
    hang = tmp_path / "hang.mp4"
    hang.write_bytes(b"x")
    batch = [target(good), target(good), target(hang), target(good)]
    threaded = ProbePool(1, probe_timeout_s=2.0, command=MISBEHAVING_WORKER, threads=4)
    await threaded.start()
    try:
        # Warm first: a busy machine's start-up of the worker is not the files' time.
        assert isinstance((await threaded.probe([target(good)]))[0], MediaInfo)
        outcomes = await threaded.probe(batch)
    finally:
        await threaded.close()
    # The hanging file is the one that fails: what was done before it was not held back.
    assert [type(o) for o in outcomes] == [MediaInfo, MediaInfo, ProbeFailure, MediaInfo]
    assert outcomes[2] == ProbeFailure("probe took longer than 2 s")


def test_a_file_whose_name_lies_is_still_described(tmp_path: Path) -> None:
    # A Matroska file named .mp4: the demuxer the name suggests fails, detection finds it.
    path = write_video(tmp_path / "really-mkv.mp4", container="matroska", subtitles=True)
    info = probe_file(target(path))
    assert isinstance(info, MediaInfo)
    assert (info.container, info.subtitle_streams) == ("matroska,webm", 1)


# -- the wire between server and workers ------------------------------------------------------

INFO_SAMPLE = MediaInfo("mov", 1.5, 900, "h264", 64, 48, Fraction(25), "aac", 1, 0, 2)
NO_DURATION = MediaInfo("matroska,webm", None, 0, "vp9", 32, 16, Fraction(30000, 1001), "", 0, 1, 0)
FAILURE = ProbeFailure("not a readable video: Invalid data")


@pytest.mark.parametrize("outcome", [INFO_SAMPLE, NO_DURATION, FAILURE])
def test_outcomes_cross_the_wire_unchanged(outcome: object) -> None:
    frame = wire.encode_outcome(outcome, 0.25)  # type: ignore[arg-type]
    (size,) = wire.FRAME.unpack_from(frame)
    assert wire.decode_reply(frame[wire.FRAME.size :]) == (outcome, 0.25)
    assert size == len(frame) - wire.FRAME.size <= wire.MAX_REPLY_BYTES


def test_targets_cross_the_wire_unchanged() -> None:
    targets = [
        ProbeTarget(b"/srv/media", b"caf\xe9/a.mp4", 2049, 12),
        ProbeTarget(b"/", b"b", 1, 2),
    ]
    frame = wire.encode_targets(targets)
    assert wire.decode_targets(frame[wire.FRAME.size :]) == targets


def _media_payload(width: int = 64) -> bytes:
    payload = wire.encode_outcome(INFO_SAMPLE)[wire.FRAME.size :]
    # the seconds (4 bytes), b"I", duration (8), bit rate (8), then the width (4)
    return payload[:21] + struct.pack("!i", width) + payload[25:]


SECONDS = struct.pack("!f", 0.5)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        SECONDS + b"X whatever",
        pickle.dumps(("failure", ("hello",))),
        SECONDS + b"F\xff\xfe",
        _media_payload()[:-1],
        _media_payload() + b"\x00",
        _media_payload(width=-1),
        struct.pack("!f", -1.0) + b"Fnegative time",
        struct.pack("!f", math.nan) + b"Fno time",
    ],
    ids=[
        "empty",
        "unknown kind",
        "pickle",
        "bad UTF-8",
        "truncated",
        "trailing",
        "negative",
        "negative seconds",
        "NaN seconds",
    ],
)
def test_a_reply_that_is_not_ours_is_refused(payload: bytes) -> None:
    with pytest.raises(wire.BadReply):
        wire.decode_outcome(payload)


def test_an_oversized_reply_is_refused_before_it_is_read() -> None:
    wire.check_size(wire.MAX_REPLY_BYTES)
    with pytest.raises(wire.BadReply, match="oversized"):
        wire.check_size(wire.MAX_REPLY_BYTES + 1)


class _Pipes:
    """A worker's pipes as the pool holds them, its output fed by the test."""

    def __init__(self) -> None:
        self.stdin = None
        self.stdout = asyncio.StreamReader()


async def test_outcomes_are_read_whole_however_the_pipe_cuts_them() -> None:
    pipes = _Pipes()
    worker = probe_module._Worker(pipes)  # type: ignore[arg-type]
    sent = [(ProbeFailure(f"bad {n}"), n / 8) for n in range(3)]
    data = b"".join(wire.encode_outcome(o, s) for o, s in sent)
    pieces = [data[:3], data[3:40], data[40:41], data[41:]]  # a header cut, then several at once

    async def feed() -> None:
        for piece in pieces:
            await asyncio.sleep(0.01)
            pipes.stdout.feed_data(piece)
        pipes.stdout.feed_eof()

    feeding = asyncio.create_task(feed())
    got = [await worker.receive() for _ in sent]
    await feeding
    assert got == sent
    with pytest.raises(asyncio.IncompleteReadError):
        await worker.receive()


async def test_an_oversized_outcome_is_refused_before_its_payload_comes() -> None:
    pipes = _Pipes()
    pipes.stdout.feed_data(wire.FRAME.pack(wire.MAX_REPLY_BYTES + 1))  # and nothing more
    with pytest.raises(wire.BadReply, match="oversized"):
        await asyncio.wait_for(probe_module._Worker(pipes).receive(), 5)  # type: ignore[arg-type]


def test_long_texts_are_cut_to_fit_the_limit() -> None:
    outcome = wire.decode_outcome(wire.encode_outcome(ProbeFailure("é" * 5000))[wire.FRAME.size :])
    assert isinstance(outcome, ProbeFailure) and outcome.message.endswith("...")
    assert len(outcome.message.encode()) <= 512
