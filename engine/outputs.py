"""A request's output as it grows: text deltas for streaming, stopping rules, and the final result.

Both the reference loop and the paged engine feed sampled tokens through `OutputBuilder`, so eos, stop
strings and length limits behave the same on every backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from hayabusa.engine.sampling import SamplingParams
from hayabusa.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float  # from the request's creation to its first sampled token
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (self.generated_tokens - 1) / decode_time if self.generated_tokens > 1 and decode_time > 0 else 0.0


@dataclass(frozen=True)
class GenerationOutput:
    text: str  # generated text only; eos and a matched stop string are not part of it
    token_ids: list[int]  # generated ids, including the eos or the token that completed a stop string
    finish_reason: str  # "stop" (eos or stop string) | "length" (max_new_tokens) | "error" (see `error`)
    prompt_token_ids: list[int]
    timings: Timings
    error: str | None = None  # why a request failed on its own (the others in the call still ran)


class OutputBuilder:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 eos_token_id: int | None) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_token_id = eos_token_id
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._decoder = StreamDecoder(tokenizer)
        self._text = ""  # all decoded text so far
        self._emitted = 0  # characters of _text handed out as deltas
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._created = time.perf_counter()
        self._first_token_at: float | None = None
        self._finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> str:
        """Record one sampled token; return the text that became final (may be "")."""
        if self.finished:
            raise RuntimeError("append() after the request finished")
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
        self.token_ids.append(token_id)
        if token_id == self.eos_token_id and not self.params.ignore_eos:
            return self._finish("stop", now, self._decoder.flush())
        self._text += self._decoder.push(token_id)
        if self.params.stop:
            # Text that could begin a stop string is never emitted, so a match starts at or after _emitted.
            hits = [i for s in self.params.stop if (i := self._text.find(s, self._emitted)) >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                return self._finish("stop", now, "")
        if len(self.token_ids) >= self.params.max_new_tokens:
            return self._finish("length", now, self._decoder.flush())
        return self._take(len(self._text) - self._held_back())

    def _held_back(self) -> int:
        """Characters at the end of the text that could still become the start of a stop string."""
        for size in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self.params.stop):
                return size
        return 0

    def _finish(self, reason: str, now: float, tail: str) -> str:
        self.finish_reason = reason
        self._finished_at = now
        self._text += tail
        return self._take(len(self._text))

    def _take(self, upto: int) -> str:
        delta = self._text[self._emitted: upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return delta

    def result(self) -> GenerationOutput:
        if not self.finished:
            raise RuntimeError("result() before the request finished")
        first = self._first_token_at if self._first_token_at is not None else self._finished_at
        return GenerationOutput(
            text=self._text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_token_ids=list(self.prompt_ids),
            timings=Timings(
                prompt_tokens=len(self.prompt_ids),
                generated_tokens=len(self.token_ids),
                time_to_first_token_s=first - self._created,
                total_s=self._finished_at - self._created,
            ),
        )
