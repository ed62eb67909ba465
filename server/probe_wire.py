"""What crosses the pipes between the server and its probe workers: small fixed structs.

A worker parses files an attacker may have crafted; should FFmpeg be exploited, the worker is
the attacker's. So its replies are data the server decodes with ``struct``, never code: no
pickle, a hard size limit (:data:`MAX_REPLY_BYTES`) read before the payload, every field
checked. An oversized or malformed reply fails that file, and the worker is replaced.

Frames are a 4-byte big-endian length, then the payload::

    request  count:u16, then per file  device:u64 inode:u64 len:u16 len:u16 root relative
    reply    seconds:f32 (the file's probe took), then
             b"F" message (UTF-8)
             b"I" duration:f64 (NaN: unknown) bit_rate:i64 width:i32 height:i32
                  rate:i64/i64 audio:i32 subtitle:i32 data:i32, then 3 x (len:u16 UTF-8):
                  container, video codec, audio codec
"""

from __future__ import annotations

import functools
import math
import struct
from fractions import Fraction

from .media import MediaInfo, ProbeFailure, ProbeOutcome, ProbeTarget

__all__ = [
    "FRAME",
    "MAX_REPLY_BYTES",
    "BadReply",
    "check_size",
    "decode_outcome",
    "decode_reply",
    "decode_targets",
    "encode_outcome",
    "encode_targets",
]

FRAME = struct.Struct("!I")
MAX_REPLY_BYTES = 4096
_MAX_TEXT_BYTES = 512
_COUNT = struct.Struct("!H")
_TARGET = struct.Struct("!QQHH")
_INFO = struct.Struct("!dqiiqqiii")
_TEXT = struct.Struct("!H")
_SECONDS = struct.Struct("!f")
_FAILURE, _MEDIA = b"F", b"I"


class BadReply(Exception):
    """A worker's reply that is not ours: too large, or not in our format."""


def encode_targets(targets: list[ProbeTarget] | tuple[ProbeTarget, ...]) -> bytes:
    """A request frame for ``targets``."""
    parts = [_COUNT.pack(len(targets))]
    for t in targets:
        parts += (_TARGET.pack(t.device, t.inode, len(t.root), len(t.relative)), t.root, t.relative)
    payload = b"".join(parts)
    return FRAME.pack(len(payload)) + payload


def decode_targets(payload: bytes) -> list[ProbeTarget]:
    """The targets of a request payload (in the worker: the server is trusted)."""
    (count,), offset, targets = _COUNT.unpack_from(payload), _COUNT.size, []
    for _ in range(count):
        device, inode, root_len, rel_len = _TARGET.unpack_from(payload, offset)
        offset += _TARGET.size
        root = payload[offset : offset + root_len]
        relative = payload[offset + root_len : offset + root_len + rel_len]
        offset += root_len + rel_len
        targets.append(ProbeTarget(root, relative, device, inode))
    return targets


def encode_outcome(outcome: ProbeOutcome, seconds: float = 0.0) -> bytes:
    """A reply frame for one file, whose probe took ``seconds``; text is cut to fit."""
    if isinstance(outcome, ProbeFailure):
        payload = _FAILURE + _cut(outcome.message)
    else:
        rate = outcome.frame_rate
        duration = outcome.duration_s
        payload = b"".join((
            _MEDIA,
            _INFO.pack(
                math.nan if duration is None else duration, outcome.bit_rate, outcome.width,
                outcome.height, rate.numerator if rate else 0, rate.denominator if rate else 0,
                outcome.audio_streams, outcome.subtitle_streams, outcome.data_streams,
            ),
            *(_text(t) for t in (outcome.container, outcome.video_codec, outcome.audio_codec)),
        ))  # fmt: skip
    payload = _SECONDS.pack(seconds) + payload
    return FRAME.pack(len(payload)) + payload


def check_size(size: int) -> None:
    """Refuse a reply's announced size before reading it.

    Raises:
        BadReply: larger than :data:`MAX_REPLY_BYTES`.
    """
    if size > MAX_REPLY_BYTES:
        raise BadReply(f"the probe worker sent an oversized reply ({size} bytes)")


def decode_outcome(payload: bytes) -> ProbeOutcome:
    """One file's outcome from a worker's reply payload (see :func:`decode_reply`)."""
    return decode_reply(payload)[0]


def decode_reply(payload: bytes) -> tuple[ProbeOutcome, float]:
    """One file's outcome, and the seconds its probe took, from a worker's reply payload.

    Raises:
        BadReply: anything but a well-formed reply of ours.
    """
    try:
        (seconds,) = _SECONDS.unpack_from(payload)
        kind, body = payload[_SECONDS.size : _SECONDS.size + 1], payload[_SECONDS.size + 1 :]
        if not 0 <= seconds < math.inf:
            raise ValueError("not a time")
        if kind == _FAILURE:
            return ProbeFailure(body.decode()), seconds
        if kind == _MEDIA:
            return _media(body), seconds
    except (struct.error, UnicodeDecodeError, ValueError, ZeroDivisionError):
        pass
    raise BadReply("the probe worker sent a reply that is not in our format")


def _media(body: bytes) -> MediaInfo:
    duration, bit_rate, width, height, num, den, audio, subtitle, data = _INFO.unpack_from(body)
    offset, texts = _INFO.size, []
    for _ in range(3):
        (length,) = _TEXT.unpack_from(body, offset)
        offset += _TEXT.size
        if offset + length > len(body):
            raise ValueError("text runs past the reply")
        texts.append(body[offset : offset + length].decode())
        offset += length
    counts = (bit_rate, width, height, num, den, audio, subtitle, data)
    if offset != len(body) or min(counts) < 0 or not (math.isnan(duration) or duration >= 0):
        raise ValueError("not a reply of ours")
    container, video_codec, audio_codec = texts
    return MediaInfo(
        container=container,
        duration_s=None if math.isnan(duration) else duration,
        bit_rate=bit_rate,
        video_codec=video_codec,
        width=width,
        height=height,
        frame_rate=_rate(num, den) if den else None,
        audio_codec=audio_codec,
        audio_streams=audio,
        subtitle_streams=subtitle,
        data_streams=data,
    )


@functools.lru_cache(maxsize=256)
def _rate(numerator: int, denominator: int) -> Fraction:
    """A frame rate: a library has a handful of them, and a Fraction costs a gcd."""
    return Fraction(numerator, denominator)


def _cut(text: str) -> bytes:
    data = text.encode(errors="replace")
    if len(data) <= _MAX_TEXT_BYTES:
        return data
    return data[: _MAX_TEXT_BYTES - 3].decode(errors="ignore").encode() + b"..."


def _text(text: str) -> bytes:
    data = _cut(text)
    return _TEXT.pack(len(data)) + data
