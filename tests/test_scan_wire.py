"""The frames between the server and its scan workers: every message survives the pipe, and a
frame that is not one of ours is refused as such."""

from __future__ import annotations

import pytest

from scanjobs.server import scan_wire as wire
from scanjobs.server.catalog import ScanCounts
from scanjobs.server.roots import Folder

ODD = bytes(range(1, 256)).replace(b"/", b"")  # every byte a file name may hold


def _body(frame: bytes) -> bytes:
    (size,) = wire.FRAME.unpack(frame[: wire.FRAME.size])
    body = frame[wire.FRAME.size :]
    assert len(body) == size
    return body


@pytest.mark.parametrize(
    "reply",
    [
        wire.Ready(),
        wire.Listed(3, (b"a", b"a/" + ODD), (b"/m/" + ODD, "cannot read: Permission denied")),
        wire.Listed(0),
        wire.Committed(
            ScanCounts(added=1, unchanged=2, failed=1),
            ((b"/m/" + ODD, "not a video: Invalid data"),),
            b"/m",
            False,
            (0.25, 1.5),
            3,
        ),
        wire.Done(retire=True),
        wire.Fault("StorageFull", "no space left on the device"),
    ],
)
def test_every_reply_survives_the_pipe(reply: wire.Reply) -> None:
    assert wire.decode_reply(_body(wire.encode(reply))) == reply


def test_a_task_survives_the_pipe() -> None:
    task = wire.DirectoryTask(
        "job", 10**18, True, False, Folder(b"/m/" + ODD, b"/m", ODD), (b"", ODD), -5, 7
    )
    assert wire.decode_task(_body(wire.encode(task))) == task


def test_a_message_with_an_undecodable_text_still_crosses() -> None:
    # An OS message decoded with surrogateescape may hold a lone surrogate, which is not
    # UTF-8: it crosses as a replacement character instead of failing the directory.
    reply = wire.Committed(ScanCounts(failed=1), ((b"/m/a.mp4", "cannot read: caf\udce9"),))
    decoded = wire.decode_reply(_body(wire.encode(reply)))
    assert isinstance(decoded, wire.Committed)
    assert decoded.errors == ((b"/m/a.mp4", "cannot read: caf?"),)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xff not json", "not JSON"),
        (b"[1, 2]", "expected a message"),
        (b'{"type": "Listed", "found": 1}', "a malformed Listed"),
        (b'{"type": "Listed", "found": 1, "folders": ["\\u0100"], "error": null}', "Latin-1"),
        (b'{"type": "Nonsense"}', "unknown reply type"),
    ],
)
def test_a_frame_that_is_not_ours_is_refused(payload: bytes, error: str) -> None:
    with pytest.raises(wire.BadFrame, match=error):
        wire.decode_reply(payload)
