"""A graceful way out for the server: stop taking requests (503), let those in flight finish within a grace period,
then end the rest with finish_reason "abort" (each client gets its text so far), so that nothing is lost silently.

`Drain` counts the HTTP requests in flight (`DrainMiddleware` wraps the routes); `hayabusa serve` runs `Drain.run`
on SIGTERM or SIGINT (shutdown.py) and exits once it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hayabusa.engine.server.engine_loop import EngineLoop
from hayabusa.engine.server.protocol import APIError

logger = logging.getLogger("hayabusa.server")

ABORTED_FLUSH_S = 5.0  # for aborted requests to send their last chunk
UNDRAINED_PATHS = frozenset({"/health", "/metrics"})  # answered while draining: health says so, metrics are scraped
RETRY_AFTER_S = 1


class Drain:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.draining = False
        self.num_in_flight = 0  # HTTP requests past DrainMiddleware whose response is not finished
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()

    def enter(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.num_in_flight -= 1
        if not self.num_in_flight:
            self._idle.set()

    def hurry(self) -> None:
        """End the grace period now (a second signal)."""
        self._hurry.set()

    async def run(self, grace_s: float) -> int:
        """Refuse new requests from now on, wait up to grace_s for those in flight, then abort the rest and wait
        for their last words. Returns how many engine requests were aborted."""
        self.draining = True
        logger.info("draining: %d requests in flight, %.1f s of grace; new requests get 503", self.num_in_flight,
                    grace_s)
        if await self._wait_idle(grace_s, stop_early=True):
            return 0
        aborted = self.loop.num_in_flight
        deadline = time.monotonic() + ABORTED_FLUSH_S
        while True:  # again: a request may reach the engine after an abort (its prompt was being encoded)
            self.loop.abort_all()
            if await self._wait_idle(0.5) or time.monotonic() >= deadline:
                break
        logger.warning("grace period over: aborted %d engine requests; %d HTTP responses still open", aborted,
                       self.num_in_flight)
        return aborted

    async def _wait_idle(self, timeout_s: float, stop_early: bool = False) -> bool:
        """Whether no request is in flight, waiting up to timeout_s (or until hurried, with stop_early)."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if stop_early:
            waits.append(asyncio.ensure_future(self._hurry.wait()))
        _, pending = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return self._idle.is_set()


class DrainMiddleware:
    """Counts the requests in flight for `Drain`, and answers 503 to new ones while it drains."""

    def __init__(self, app: ASGIApp, drain: Drain, refuse: Callable[[APIError], Response]) -> None:
        self.app = app
        self.drain = drain
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNDRAINED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            refusal = APIError(503, "the server is shutting down and takes no new requests; retry (on another "
                                    "replica)", type="server_error", code="shutting_down",
                               headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            await self.refuse(refusal)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
