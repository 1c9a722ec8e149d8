"""Beam search bookkeeping of one request, step by step, with transformers' semantics (`generate(num_beams=k,
do_sample=False)`, transformers 5.x `GenerationMixin._beam_search` and its helpers).

The caller owns the model and the KV cache; each step it hands over the log-probabilities of the running beams and
gets back, per new beam slot, the row it continues (its parent) and the token it appends. What each piece mirrors:

- Scores. A beam's score is the sum of its tokens' log-probabilities: log-softmax of the fp32 logits, then the logits
  processors (repetition penalty) applied to those log-probabilities, as transformers orders them (`beam_logprobs`).
- First step. transformers starts k identical copies of the prompt, the first at score 0 and the others at -1e9, so
  only the first copy's tokens are picked. `step` takes the prompt's single row there and does the same.
- Candidates (`_get_top_k_continuations`). The best `max(2, 1 + number of eos ids) * k` (token, beam) pairs over all
  k * vocab accumulated scores: enough that k of them are still running even if every beam's best tokens end it.
  Exact ties go to the lower beam, then the lower token id (transformers' `torch.topk` leaves tie order unspecified).
- Running beams (`_get_running_beams_for_next_iteration`): the k best candidates that did not just finish.
- Finished hypotheses (`_update_finished_beams`). A candidate finishes when its token is an eos id or it reaches
  max_new_tokens; it is a hypothesis only if it ranks among the first k candidates (the rest are spares for the
  running set). Its score is its sum divided by `generated_tokens ** length_penalty`, counting the generated tokens
  only (eos included; the prompt not). The k best hypotheses are kept.
- Stopping (`_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`). With k hypotheses held, the
  best running beam's score divided by `L ** length_penalty` bounds what it could still reach: L is the generated
  length so far, or max_new_tokens with early_stopping="never" and length_penalty > 0. Once that bound is not
  above the worst hypothesis, the request is done; so it is when early_stopping=True and k hypotheses are held, or
  when every candidate finished (max_new_tokens reached). (transformers keeps stepping a batch until all its
  prompts are done, adding nothing to those that are: the same results as each prompt alone.)
- Results: the hypotheses best first; `score` is transformers' `sequences_scores`.

Per step the device does the top-k; O(k) numbers come to the host (the caller needs parents and tokens there to fork
KV blocks). Token histories are kept as parent pointers, so a step costs O(k) whatever the length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hayabusa.engine.sample.logits_processors import penalize_generated
from hayabusa.engine.sample.ops import apply_penalty
from hayabusa.engine.sample.processors_from_lists import listed_processors, seen_mask
from hayabusa.engine.sampling_params import SamplingParams

DEAD_BEAM_SCORE = -1.0e9  # transformers' score of the initial copies 2..k and of an empty hypothesis slot


class BeamStep(NamedTuple):
    """What one step decided. parents[i]: the row of the logprobs just given that new beam slot i continues (at the
    first step always 0, the prompt); tokens[i]: the token slot i appends. Meaningless once done is True."""

    parents: list[int]  # [num_beams]
    tokens: list[int]  # [num_beams]
    done: bool


@dataclass(frozen=True)
class BeamHypothesis:
    token_ids: list[int]  # generated tokens, the eos included when it ended on one
    score: float  # sum of log-probabilities / len(token_ids) ** length_penalty (transformers' sequences_scores)
    ended_on_eos: bool


class _Hypothesis(NamedTuple):
    score: float
    step: int  # the step that appended its last token
    parent: int  # the running slot (after step - 1) it extends
    token: int
    ended_on_eos: bool


class BeamSearch:
    """One request's beam search. Drive it with `step` until it returns done, then read `results`."""

    def __init__(self, num_beams: int, max_new_tokens: int, eos_token_ids: Sequence[int], *,
                 length_penalty: float = 1.0, early_stopping: bool | str = False,
                 device: torch.device | str = "cpu") -> None:
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"beam search needs num_beams >= 1 and max_new_tokens >= 1, got {num_beams} and "
                             f"{max_new_tokens}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * num_beams
        self._eos_ids = torch.tensor(list(eos_token_ids), dtype=torch.int64, device=device)
        self._running_scores = torch.full((num_beams,), DEAD_BEAM_SCORE, device=device)  # [k] fp32
        self._running_scores[0] = 0.0
        self._history: list[list[tuple[int, int]]] = []  # per step, per new slot: (parent slot, token)
        self._finished: list[_Hypothesis] = []  # at most k, best first
        self.done = False

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Sequence[int],
                    device: torch.device | str = "cpu") -> BeamSearch:
        return cls(params.num_beams, params.max_new_tokens, () if params.ignore_eos else eos_token_ids,
                   length_penalty=params.length_penalty, early_stopping=params.early_stopping, device=device)

    @property
    def steps(self) -> int:
        """Tokens generated so far by every running beam."""
        return len(self._history)

    def step(self, logprobs: Tensor) -> BeamStep:
        """logprobs: [rows, vocab], rows = 1 at the first step (the prompt), else num_beams in slot order."""
        if self.done:
            raise RuntimeError("step() after the beam search finished")
        k = self.num_beams
        rows, vocab = logprobs.shape
        if rows != (1 if not self._history else k):
            raise ValueError(f"step {self.steps} takes logprobs of {1 if not self._history else k} rows, got {rows}")
        # accumulated: [k, vocab]; at the first step the prompt's row stands for all k identical copies.
        accumulated = logprobs.float().expand(k, vocab) + self._running_scores[:, None]
        values, flat_index = topk_lower_index_on_ties(accumulated.reshape(-1), self.num_candidates)  # [C]
        beams = flat_index // vocab if rows > 1 else torch.zeros_like(flat_index)
        tokens = flat_index % vocab
        generated = self.steps + 1
        is_eos = torch.isin(tokens, self._eos_ids)
        finishes = is_eos | (generated >= self.max_new_tokens)
        # Running: the first k candidates that go on; a stable sort keeps their rank order.
        running = torch.sort(finishes.to(torch.int32), stable=True).indices[:k]  # [k]
        self._running_scores = values[running]
        # Divided exactly as transformers divides (an fp32 tensor by a Python float), so scores match to the bit.
        hypothesis_scores = values[:k] / (generated ** self.length_penalty)
        bound_length = self.max_new_tokens if self.early_stopping == "never" and self.length_penalty > 0 else generated
        running_bound = self._running_scores[:1] / (bound_length ** self.length_penalty)
        # One sync for O(k) numbers: the first k candidates (the only ones that can become hypotheses) and the
        # running slots' parents and tokens.
        packed = torch.cat([t[:k].double() for t in (beams, tokens, is_eos, finishes, hypothesis_scores)]
                           + [beams[running].double(), tokens[running].double(), running_bound.double(),
                              finishes.all()[None].double()]).tolist()
        beams_h, tokens_h, is_eos_h, finishes_h, scores_h, parents, new_tokens = (
            packed[i * k:(i + 1) * k] for i in range(7))
        bound, all_finish = packed[7 * k:]
        parents, new_tokens = [int(p) for p in parents], [int(t) for t in new_tokens]

        new = [_Hypothesis(scores_h[i], self.steps, int(beams_h[i]), int(tokens_h[i]), bool(is_eos_h[i]))
               for i in range(k) if finishes_h[i]]
        # Held hypotheses before new ones on equal scores; sorted() is stable.
        self._finished = sorted(self._finished + new, key=lambda h: -h.score)[:k]
        self._history.append(list(zip(parents, new_tokens, strict=True)))
        worst = self._finished[-1].score if len(self._finished) == k else DEAD_BEAM_SCORE
        self.done = (not bound > worst or (self.early_stopping is True and len(self._finished) == k)
                     or bool(all_finish))
        return BeamStep(parents, new_tokens, self.done)

    def results(self, n: int | None = None) -> list[BeamHypothesis]:
        """The n best hypotheses (default: all num_beams), best first."""
        if not self.done:
            raise RuntimeError("results() before the beam search finished")
        return [BeamHypothesis(self._tokens_of(h), h.score, h.ended_on_eos) for h in self._finished[:n]]

    def _tokens_of(self, hypothesis: _Hypothesis) -> list[int]:
        tokens, slot = [hypothesis.token], hypothesis.parent
        for step in range(hypothesis.step - 1, -1, -1):
            slot, token = self._history[step][slot]
            tokens.append(token)
        return tokens[::-1]


def beam_logprobs(logits: Tensor, params: SamplingParams, token_lists: Sequence[Sequence[int]], num_generated: int,
                  model_eos_token_id: int | None, allowed: Tensor | None = None) -> Tensor:
    """logits [rows, vocab] of beams whose tokens (prompt included) are token_lists, the last num_generated of them
    generated -> what BeamSearch.step takes: fp32 log-softmax, then the logits processors on those log-probabilities
    (transformers' order in beam search), in the sampler's order: logit_bias, the repetition penalty over each beam's
    own tokens, the frequency and presence penalties over its generated ones, and -inf where no_repeat_ngram_size,
    bad_words_ids or min_new_tokens forbid a token; then -inf where a structured output's grammar does not allow it
    (allowed: bool [rows, vocab], or None)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows, vocab = logprobs.shape
    processors = listed_processors([params] * rows, token_lists, [num_generated] * rows, model_eos_token_id, vocab,
                                   logits.device) if params.needs_processors else None
    if processors is not None:
        logprobs = logprobs + processors.logit_bias
    if params.repetition_penalty != 1.0:
        penalty = torch.full((rows,), params.repetition_penalty, device=logits.device)
        logprobs = apply_penalty(logprobs, seen_mask(token_lists, vocab, logits.device), penalty)
    if processors is not None:
        logprobs = penalize_generated(logprobs, processors.generated_counts, processors.frequency_penalty,
                                      processors.presence_penalty).masked_fill(processors.banned, float("-inf"))
    if allowed is not None:
        logprobs = logprobs.masked_fill(~allowed, float("-inf"))
    return logprobs


def topk_lower_index_on_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores: fp32 [n] -> (values [k], indices [k]) best first; equal scores go lower index first, on every device.

    One int64 key per entry orders like (score, -index): the fp32 bits made order-preserving as integers (a
    negative float's magnitude bits flipped) in the high half, the reversed index in the low half.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(scores.numel(), device=scores.device)
    keys = ordered * (1 << 32) + ((1 << 32) - 1 - index)
    indices = torch.topk(keys, k).indices
    return scores[indices], indices
