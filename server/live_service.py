"""The live-library RPCs of the ScanService servicer: WatchVideos and ListRoots.

Proto <-> domain conversion only; ``server.service`` (which this is a part of) maps the
errors raised here to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from scanjobs.v1 import scanjobs_pb2 as pb

from . import errors
from .catalog import Catalog
from .changes import VideoChange, follow
from .jobs import display_path
from .library_watch import RootState, WatchMode
from .roots import RootPolicy

__all__ = ["LiveLibrary", "StreamSlots", "change_to_proto", "changes_of", "roots_reply"]

_Context = grpc.aio.ServicerContext[Any, Any]
_MODE_TO_PB = {
    WatchMode.EVENTS: pb.WATCH_MODE_EVENTS,
    WatchMode.POLLING: pb.WATCH_MODE_POLLING,
    WatchMode.OFF: pb.WATCH_MODE_OFF,
}


class StreamSlots:
    """A count of open WatchVideos streams, over both ports, and its limit.

    The gRPC servicer and the Connect one hold the same instance, so ``--max-watchers``
    bounds the streams of both transports together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the duration of the block.

        Raises:
            ResourceExhausted: every slot is taken (reason ``TOO_MANY_WATCHERS``).
        """
        if self.open >= self.limit:
            raise errors.ResourceExhausted(
                "too many WatchVideos streams", reason="TOO_MANY_WATCHERS"
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class LiveLibrary:
    """WatchVideos and ListRoots, mixed into ``ScanService``.

    Args:
        max_video_watchers: open WatchVideos streams before RESOURCE_EXHAUSTED.
        root_states: each root's watch state (the watcher's), or None without ``--watch``.
        poll_s: the safety net under the change notifications.
    """

    def __init__(
        self,
        catalog: Catalog,
        roots: RootPolicy,
        max_video_watchers: int,
        root_states: Callable[[], Awaitable[list[RootState]]] | None,
        poll_s: float = 5.0,
    ) -> None:
        self._live_catalog = catalog
        self._live_roots = roots
        self.video_slots = StreamSlots(max_video_watchers)
        self._root_states = root_states
        self._poll_s = poll_s
        self._closing = asyncio.Event()

    @property
    def video_watchers(self) -> int:
        """Open WatchVideos streams."""
        return self.video_slots.open

    def close(self) -> None:
        """End every WatchVideos stream (with UNAVAILABLE) and refuse new ones."""
        self._closing.set()

    async def WatchVideos(self, request: pb.WatchVideosRequest, context: _Context) -> None:
        # A coroutine around context.write, like WatchJob; the stream ends with UNAVAILABLE
        # when the server shuts down.
        if self._closing.is_set():
            raise errors.Unavailable("the server is shutting down")
        with self.video_slots.hold():
            # Headers now: a client knows the watch is in place before the first change.
            await context.send_initial_metadata(())
            await self._until_closing(self._send_changes(request, context))

    async def _until_closing(self, work: Awaitable[None]) -> None:
        """Run ``work`` until it ends, or until the server shuts down (UNAVAILABLE)."""
        pump = asyncio.ensure_future(work)
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait({pump, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                raise errors.Unavailable("the server is shutting down")
            pump.result()
        finally:
            for task in (pump, closing):
                task.cancel()
            await asyncio.gather(pump, closing, return_exceptions=True)

    async def _send_changes(self, request: pb.WatchVideosRequest, context: _Context) -> None:
        changes = changes_of(self._live_catalog, self._live_roots, request, self._poll_s)
        async with contextlib.aclosing(changes):
            async for change in changes:
                await context.write(change)

    async def ListRoots(
        self, request: pb.ListRootsRequest, context: _Context
    ) -> pb.ListRootsResponse:
        return await roots_reply(self._live_catalog, self._live_roots, self._root_states)


def changes_of(
    catalog: Catalog, roots: RootPolicy, request: pb.WatchVideosRequest, poll_s: float = 5.0
) -> AsyncGenerator[pb.VideoEvent, None]:
    """The VideoEvents a WatchVideos request asks for (see ``server.changes.follow``)."""

    async def events() -> AsyncGenerator[pb.VideoEvent, None]:
        changes = follow(
            catalog,
            path_prefix=os.fsencode(request.path_prefix),
            after=request.after_sequence,
            roots=roots.listed(),
            poll_s=poll_s,
        )
        async with contextlib.aclosing(changes):
            async for change in changes:
                yield change_to_proto(change)

    return events()


async def roots_reply(
    catalog: Catalog,
    roots: RootPolicy,
    root_states: Callable[[], Awaitable[list[RootState]]] | None,
) -> pb.ListRootsResponse:
    """Each root, how it is watched, when it was last reconciled, how many videos it has."""
    states = (
        await root_states()
        if root_states is not None
        else [
            RootState(r, WatchMode.OFF, "the server runs without --watch") for r in roots.resolved
        ]
    )
    reply = pb.ListRootsResponse()
    for state in states:
        count, _ = await catalog.live_below(os.fsencode(state.path), 0)
        root = reply.roots.add(
            path=state.path, watch_mode=_MODE_TO_PB[state.mode], reason=state.reason,
            video_count=count,
        )  # fmt: skip
        if state.last_reconcile_ns is not None:
            root.last_reconcile_time.FromNanoseconds(state.last_reconcile_ns)
    return reply


def change_to_proto(change: VideoChange) -> pb.VideoEvent:
    """The wire form of a catalog change."""
    from .service import video_to_proto

    previous = change.previous_path
    return pb.VideoEvent(
        sequence=change.sequence,
        kind=int(change.kind),  # type: ignore[arg-type]  # the values are the enum's
        video=video_to_proto(change.video),
        previous_path=display_path(previous) if previous is not None else "",
        event_time=_ns_timestamp(change.time_ns),
    )


def _ns_timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp
