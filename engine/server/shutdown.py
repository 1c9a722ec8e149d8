"""`hayabusa serve` under uvicorn, shutting down gracefully: SIGTERM or SIGINT drains the app (drain.py) and then
stops uvicorn, and the process exits 0. A second signal ends the grace period at once; a third stops without
waiting for open connections."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from hayabusa.engine.server.drain import Drain

logger = logging.getLogger("hayabusa.server")

CLOSE_CONNECTIONS_S = 5.0  # uvicorn's wait for connections still open once the drain is done


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        config.timeout_graceful_shutdown = CLOSE_CONNECTIONS_S
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self.num_signals = 0
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._event_loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread): hand the signal to the event loop. Unlike uvicorn's own, it does not
        re-raise the signal after shutdown, so a drained server exits 0."""
        if self._event_loop is None:  # before serving started: nothing to drain
            self.should_exit = True
            return
        self._event_loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.num_signals += 1
        name = signal.Signals(sig).name
        if self.num_signals == 1:
            logger.info("%s: shutting down gracefully (again: abort the requests in flight at once)", name)
            self._draining = asyncio.ensure_future(self._drain_then_exit())
        elif self.num_signals == 2:
            logger.warning("%s again: aborting the requests in flight", name)
            self.drain.hurry()
        else:
            logger.warning("%s a third time: stopping without waiting for open connections", name)
            self.force_exit = self.should_exit = True

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.grace_s)
        finally:
            self.should_exit = True
