"""What a request's outputs are: the types the API hands out (GenerationOutput with its Timings, TokenLogprobs and
SpeculationStats; RequestUpdate, one step's news of a request; ScoreOutput; EngineStats), and `OutputBuilder`, which
turns a request's sampled tokens into them: text deltas for streaming, stopping rules, the final result.

Both the reference loop and the paged engine feed sampled tokens through `OutputBuilder`, so eos, stop strings and
length limits behave the same on every backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from hayabusa.engine.sampling_params import SamplingParams, eos_token_ids
from hayabusa.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from hayabusa.engine.sample.grammars import GrammarMatcher
    from hayabusa.engine.sample.logprobs import HostLogprobs

NO_ALLOWED_TOKEN = ("no token satisfies structured_outputs together with the request's other options "
                    "(bad_words_ids, no_repeat_ngram_size, min_new_tokens, eos_token_id)")


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float  # from the request's creation to its first sampled token
    total_s: float


@dataclass(frozen=True)
class TokenLogprobs:
    """One position of an output: its token, that token's logprob, and the most likely tokens there."""

    token_id: int
    logprob: float  # log p(token | everything before it), from the raw logits
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the N most likely tokens, most likely first


@dataclass(frozen=True)
class SpeculationStats:
    """Prompt-lookup speculation of one request (prompt_lookup_num_tokens)."""

    draft_tokens: int  # tokens drafted and checked
    accepted_tokens: int  # drafts the model agreed with
    draft_checks: int  # forward passes that checked drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass(frozen=True)
class GenerationOutput:
    text: str  # generated text only; eos and a matched stop string are not part of it
    token_ids: list[int]  # generated ids, including the eos or the token that completed a stop string
    # "stop" (eos or stop string) | "length" (max_new_tokens) | "abort" (aborted) | "error" (see `error`)
    finish_reason: str
    prompt_token_ids: list[int]
    timings: Timings
    error: str | None = None  # why a request failed on its own (the others in the call still ran), or "aborted"
    speculation: SpeculationStats | None = None  # with prompt_lookup_num_tokens
    logprobs: list[TokenLogprobs] | None = None  # per token of token_ids, when SamplingParams.logprobs asked
    # Per prompt token, when SamplingParams.prompt_logprobs asked: None for the first (it has no prefix).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Beam search (num_beams > 1): the hypothesis' summed logprobs / len(token_ids) ** length_penalty, the number
    # transformers returns as sequences_scores. None otherwise.
    score: float | None = None
    # The summed logprobs (raw logits, as `logprobs`) of token_ids, when they were computed: SamplingParams.logprobs
    # asked, or best_of ranked candidates by it. None otherwise.
    cumulative_logprob: float | None = None
    # With structured_outputs: whether text is a whole match. True when it ended on eos (allowed only where the
    # grammar may end) or ran out of max_new_tokens just where it may end; False when max_new_tokens ran out before
    # (finish_reason "length": raise max_new_tokens, or bound the schema's lengths), a stop string cut it, or it was
    # aborted or failed. None without structured_outputs.
    structured_output_complete: bool | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """How likely a continuation is after its context (Engine.score), from the model's raw logits."""

    total_logprob: float  # log p(continuation | context): the sum of token_logprobs
    token_logprobs: list[float]  # per continuation token, given the context and the continuation before it
    is_greedy: bool  # every continuation token is the most likely token at its position (greedy decoding's pick)
    token_ids: list[int]  # the continuation's tokens


class RequestUpdate(NamedTuple):
    """What one engine step made known about one completion of a request (the paged engine's `step()` returns
    these). Immutable; a NamedTuple, because the engine builds one per running completion per step and a frozen
    dataclass of these fields costs about three times as much to build."""

    request_id: int
    new_token_ids: list[int]  # tokens of this completion that became known this step (usually 1)
    text_delta: str  # text that became final (text that could still start a stop string is held back)
    finished: GenerationOutput | None  # the final output on the completion's last update, else None
    index: int = 0  # which of the request's num_return_sequences completions this is about
    new_logprobs: list[TokenLogprobs] | None = None  # per new token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the completion's first update, when asked


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # requests holding KV blocks (decoding, or about to learn they finished)
    num_waiting: int  # queued for a prefill (new or preempted)
    num_free_blocks: int
    num_blocks: int


class OutputBuilder:
    """Turns a request's sampled tokens into text deltas and decides when it stops (eos, stop string, length).

    Only the text after the last delta (`_held`) is ever searched: a stop string can only start there, because text
    that could begin one is never released. So each token costs the same however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 eos_token_id: int | None, grammar: GrammarMatcher | None = None) -> None:
        """grammar: params.structured_outputs' matcher at its start (engine.sample.grammars); every appended token
        advances it, and a token it does not allow fails the request."""
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_token_id = eos_token_id
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.wants_token_logprobs else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None  # set by the prefill that scores the prompt
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._stop_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids(params, eos_token_id))
        self._stops = params.stop
        self._max_new_tokens = params.max_new_tokens
        self._decoder = StreamDecoder(tokenizer)
        self._final: list[str] = []  # the text handed out as deltas so far, in pieces
        self._held = ""  # decoded text after the last delta: it could still begin a stop string
        self._created = time.perf_counter()
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self._speculation = [0, 0, 0]  # SpeculationStats' fields
        self.score: float | None = None  # beam search: the hypothesis's sequences_scores
        self.grammar = grammar

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self) -> OutputBuilder:
        """A builder for a fork of this unfinished request: its prompt, params and tokens so far (their text counts
        as already released), timed from the same start."""
        child = OutputBuilder(self._tokenizer, self.prompt_ids, self.params, self.eos_token_id,
                              self.grammar.restarted() if self.grammar is not None else None)
        for token_id in self.token_ids:
            child.append(token_id)
        child._created, child._first_token_at = self._created, self._first_token_at
        child.prompt_logprobs = self.prompt_logprobs
        if self.logprobs is not None:
            child.logprobs = list(self.logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        return child

    def record_logprobs(self, sampled: HostLogprobs, row: int, token_id: int) -> None:
        """The logprobs of the token just sampled at `row` of a step's read-back (params.wants_token_logprobs)."""
        if self.logprobs is not None:
            self.logprobs.append(sampled.entry(row, token_id, self.params.logprobs))
        self.cumulative_logprob += float(sampled.chosen[row])

    def append(self, token_id: int) -> str:
        """Record one sampled token; return the text that became final (may be "")."""
        if self.finish_reason is not None:
            raise RuntimeError("append() after the request finished")
        if self.grammar is not None and not self.grammar.accept(token_id):
            self.abort("error", f"{NO_ALLOWED_TOKEN} at completion token {len(self.token_ids)}")
            return ""
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self.token_ids.append(token_id)
        if token_id in self._stop_ids:
            return self._finish("stop", self._held + self._decoder.flush())
        text = self._decoder.push(token_id)
        if self._stops:
            return self._append_checking_stops(self._held + text)
        if len(self.token_ids) >= self._max_new_tokens:
            return self._finish("length", text + self._decoder.flush())
        if text:
            self._final.append(text)
        return text

    def end_of_prompt(self) -> None:
        """Finish a request that generates nothing (max_new_tokens 0) once its prompt is processed."""
        self._finish("length", "")

    def _append_checking_stops(self, text: str) -> str:
        """append() for a request with stop strings: text is everything decoded since the last delta."""
        hits = [i for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            return self._finish("stop", text[: min(hits)])
        if len(self.token_ids) >= self._max_new_tokens:
            return self._finish("length", text + self._decoder.flush())
        held = self._held_back(text)
        self._held = text[len(text) - held:] if held else ""
        delta = text[: len(text) - held]
        if delta:
            self._final.append(delta)
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end of text that could still become the start of a stop string."""
        longest = max(len(s) for s in self._stops)
        for size in range(min(longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    def _finish(self, reason: str, delta: str) -> str:
        self.finish_reason = reason
        self._finished_at = time.perf_counter()
        self._held = ""
        if delta:
            self._final.append(delta)
        return delta

    def count_draft_check(self, num_drafts: int, num_accepted: int) -> None:
        """One forward pass checked num_drafts draft tokens and agreed with the first num_accepted."""
        self._speculation[0] += num_drafts
        self._speculation[1] += num_accepted
        self._speculation[2] += 1

    def abort(self, reason: str, error: str) -> None:
        """Finish early ("abort" or "error"): the output keeps the tokens and the text released so far."""
        if self.finish_reason is None:
            self.error = error
            self._finish(reason, "")

    def result(self) -> GenerationOutput:
        if not self.finished:
            raise RuntimeError("result() before the request finished")
        first = self._first_token_at if self._first_token_at is not None else self._finished_at
        return GenerationOutput(
            text="".join(self._final),
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_token_ids=list(self.prompt_ids),
            timings=Timings(
                prompt_tokens=len(self.prompt_ids),
                generated_tokens=len(self.token_ids),
                time_to_first_token_s=first - self._created,
                total_s=self._finished_at - self._created,
            ),
            error=self.error,
            speculation=SpeculationStats(*self._speculation)
            if self.params.prompt_lookup_num_tokens is not None else None,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_logprobs,
            score=self.score,
            cumulative_logprob=self.cumulative_logprob,
            structured_output_complete=None if self.grammar is None else self._structure_complete(),
        )

    def _structure_complete(self) -> bool:
        if self.finish_reason == "stop":
            return bool(self.token_ids) and self.token_ids[-1] in self._stop_ids  # eos, not a stop string
        return self.finish_reason == "length" and self.grammar.is_complete
