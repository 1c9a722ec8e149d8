"""The one background thread that steps the paged engine and hands each request's updates to its asyncio task.

HTTP handlers never step the engine: they `submit` prompts and await a `Submission`, whose queue this thread
fills through `loop.call_soon_threadsafe` (one call per event loop per step). Requests from every connection
batch together in the engine. The thread sleeps on a condition while the engine has no work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from hayabusa.engine.core.paged_engine import PagedEngine, RequestUpdate
from hayabusa.engine.sampling_params import SamplingParams

logger = logging.getLogger("hayabusa.server")


class QueueFullError(Exception):
    """More requests are waiting than the server accepts (`max_waiting`)."""


class EngineFailedError(Exception):
    """The engine step running this request raised; the message names the exception, never a traceback."""


@dataclass
class _Closed:
    """The last item of an aborted or failed submission's queue."""

    error: str | None  # None: aborted by the server side (e.g. the client disconnected)


class Submission:
    """The engine requests of one API call (one per prompt, each of num_return_sequences completions), awaited in
    one asyncio loop."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self.event_loop = event_loop
        self.request_ids: list[int] = []  # index i: the i-th prompt handed to submit()
        self.created = time.perf_counter()
        self.queue: asyncio.Queue[list[tuple[int, RequestUpdate]] | _Closed] = asyncio.Queue()
        self.num_unfinished = 0  # completions, counted by the reader
        self.closed = False  # aborted or failed: no more updates will come

    @property
    def finished(self) -> bool:
        return self.closed or self.num_unfinished == 0

    async def updates(self) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """(prompt index, update) until every completion finished (update.index tells a prompt's completions apart);
        stops early when aborted; raises EngineFailedError when the engine failed."""
        while self.num_unfinished:
            item = await self.queue.get()
            if isinstance(item, _Closed):
                if item.error is not None:
                    raise EngineFailedError(item.error)
                return
            for index, update in item:
                self.num_unfinished -= update.finished is not None
                yield index, update


@dataclass
class _Tracked:
    submission: Submission
    index: int
    last_token_at: list[float | None]  # per completion, for the inter-token latency
    num_unfinished: int  # completions


class EngineLoop:
    def __init__(self, engine: PagedEngine, *, max_waiting: int, observer: LoopObserver | None = None) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self._lock = threading.Lock()  # guards _tracked and _stopping; taken before the engine's own lock
        self._wake = threading.Condition(self._lock)
        self._tracked: dict[int, _Tracked] = {}  # engine request id -> where its updates go
        self._stopping = False
        self._flush = False  # step once more even without work: aborts' final updates wait in the engine
        self._thread = threading.Thread(target=self._run, name="hayabusa-engine-loop", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fail what is still queued and join the thread (it finishes the step it is in)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._close_all("the server is shutting down")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_in_flight(self) -> int:
        """Engine requests submitted and not yet ended (or aborted)."""
        with self._lock:
            return len(self._tracked)

    # ---- called from asyncio handlers --------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Submission:
        """Queue one engine request per prompt. Raises QueueFullError, or ValueError if one can never run (then
        none of them is queued)."""
        submission = Submission(asyncio.get_running_loop())
        with self._wake:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            num_waiting = self.engine.stats().num_waiting
            if num_waiting + len(prompts) > self.max_waiting:
                raise QueueFullError(f"{num_waiting} requests are waiting; the server accepts {self.max_waiting}")
            for index, prompt in enumerate(prompts):
                try:
                    request_id = self.engine.add_request(prompt, params)
                except ValueError as err:
                    self._abort_locked(submission, finish_reason=None)  # rejected, not aborted
                    raise ValueError(f"prompt {index}: {err}" if len(prompts) > 1 else str(err)) from None
                submission.request_ids.append(request_id)
                n = params.num_return_sequences
                self._tracked[request_id] = _Tracked(submission, index, [None] * n, n)
            submission.num_unfinished = len(prompts) * params.num_return_sequences
            self._wake.notify()
        return submission

    def abort(self, submission: Submission) -> None:
        """Drop a submission's unfinished requests (their blocks are freed by the next step) and end its updates;
        a no-op once all of them finished. Call it from the submission's event loop."""
        if submission.finished:
            return
        with self._lock:
            self._abort_locked(submission, finish_reason="abort")
        submission.closed = True
        submission.queue.put_nowait(_Closed(error=None))

    def abort_all(self) -> None:
        """End every request in flight with finish_reason "abort", keeping their clients: each gets its final update
        (its text so far) from the next step, as if it had finished (a draining server's last word)."""
        with self._wake:
            for request_id in self._tracked:
                self.engine.abort(request_id)
            self._flush = True
            self._wake.notify()

    def _abort_locked(self, submission: Submission, finish_reason: str | None) -> None:
        dropped = {i: tracked for i in submission.request_ids if (tracked := self._tracked.pop(i, None)) is not None}
        for request_id in dropped:
            self.engine.abort(request_id)
        if dropped and finish_reason is not None and self.observer is not None:
            self.observer.on_closed(finish_reason, sum(tracked.num_unfinished for tracked in dropped.values()))
        self._wake.notify()

    # ---- the loop thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._flush and not self.engine.has_unfinished_requests():
                    self._wake.wait()
                if self._stopping:
                    return
                self._flush = False
            try:
                self._fan_out(self.engine.step())
            except Exception as err:  # tell the clients of every request in flight; keep serving
                logger.exception("engine step failed")
                self._close_all(f"the engine step failed: {type(err).__name__}: {err}")

    def _fan_out(self, updates: list[RequestUpdate]) -> None:
        now = time.perf_counter()
        batches: dict[Submission, list[tuple[int, RequestUpdate]]] = {}
        with self._lock:
            for update in updates:
                tracked = self._tracked.get(update.request_id)
                if tracked is None:  # aborted: nobody is listening
                    continue
                if update.finished is not None:
                    tracked.num_unfinished -= 1
                    if not tracked.num_unfinished:
                        del self._tracked[update.request_id]
                if self.observer is not None:
                    self.observer.on_update(update, tracked.submission.created, tracked.last_token_at[update.index],
                                            now)
                if update.new_token_ids:
                    tracked.last_token_at[update.index] = now
                batches.setdefault(tracked.submission, []).append((tracked.index, update))
        self._deliver([(submission, batch) for submission, batch in batches.items()])

    def _close_all(self, error: str) -> None:
        with self._lock:
            submissions = {tracked.submission for tracked in self._tracked.values()}
            for submission in submissions:
                self._abort_locked(submission, "error")  # the engine also drops ids added after the step began
        self._deliver([(submission, _Closed(error)) for submission in submissions])

    @staticmethod
    def _deliver(items: list[tuple[Submission, list[tuple[int, RequestUpdate]] | _Closed]]) -> None:
        """One thread-safe callback per event loop for all of its submissions' items of this step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for submission, item in items:
            by_loop.setdefault(submission.event_loop, []).append((submission, item))
        for event_loop, batch in by_loop.items():
            try:
                event_loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: its handlers are gone
                pass


def _put_all(batch: list[tuple[Submission, list[tuple[int, RequestUpdate]] | _Closed]]) -> None:
    for submission, item in batch:
        if isinstance(item, _Closed):
            if submission.closed:
                continue
            submission.closed = True
        submission.queue.put_nowait(item)


class LoopObserver(Protocol):
    """Told what happens to requests (the server's metrics implement it); must be cheap and thread-safe."""

    def on_update(self, update: RequestUpdate, created: float, last_token_at: float | None, now: float) -> None:
        """A delivered update; `created`: its submission's time, `last_token_at`: its previous token's."""

    def on_closed(self, finish_reason: str, num_requests: int) -> None:
        """Requests that ended without a final update: "abort" (dropped) or "error" (the engine step failed)."""
