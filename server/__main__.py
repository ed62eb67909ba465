"""``scanjobs-server`` / ``python -m scanjobs.server``: serve until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import logs
from .app import ListenError, start
from .config import Config, parse_args
from .errors import StorageIOError
from .store import DatabaseCorrupt, DatabaseInUse

log = logging.getLogger("scanjobs.server")

EXIT_BAD_DATABASE = 3
EXIT_CANNOT_LISTEN = 4


async def _serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(128 + signum)
        log.info("signal received: draining", extra={"signal": signal.Signals(signum).name})
        stop.set()

    # Handlers go in before start-up, so that a signal during it still drains cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    app = await start(config)
    # What the start-up built lives as long as the server (about 50,000 objects): frozen, it
    # is not walked again by every full garbage collection, a pause of some milliseconds that
    # would hold up whatever the event loop has to do (a cancel's terminal event).
    gc.collect()
    gc.freeze()
    await stop.wait()
    await app.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the process exit code."""
    config = parse_args(argv)
    logs.configure(config.log_level)
    try:
        asyncio.run(_serve(config))
    except (DatabaseCorrupt, DatabaseInUse, StorageIOError) as exc:
        log.error("cannot open the database: %s", exc)
        return EXIT_BAD_DATABASE
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LISTEN
    return 0


if __name__ == "__main__":
    sys.exit(main())
