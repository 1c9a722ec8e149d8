"""Beam search in the paged engine: one request's num_beams beams as running sequences that share KV blocks.

A request with num_beams = k > 1 is admitted as k sequences, beam slot i held by `seqs[i]`: the first computes the
prompt (in chunks, engine.core.scheduler) and the other k - 1 are forked from it at admission and wait, so all k share
the prompt's blocks. The step that runs the prompt's last chunk gives one row of logits (`rows`: the prompt's); every
later step one row per beam, each fed from the host the token its beam appended (beam steps are read back at once: the
next tokens are known only once the search picked them). The output processor hands the rows' logits to `score` (the
request's BeamSearch, engine.decoding.beam_search) and applies the BeamStep with `advance`: beam slot i continues parent
p_i, taking p_i's tokens plus its new token; the scheduler then gives it p_i's block table by reference
(Scheduler.update_from_outputs). Beams that agree share their blocks, and a beam copies the block it writes into only
when another beam holds it too (copy-on-write, engine.core.block_manager), so memory grows with how far the beams
diverge, not with beams x context.

With structured outputs each beam slot walks the grammar with a matcher of its own (taking its parent's, plus its
new token, at each step); `score` masks each row's log-probabilities to what its beam's grammar allows, on the
device, before the search ranks them, so every hypothesis keeps to the grammar and ends on eos only where it may.

When the search is done, its best num_return_sequences hypotheses become the outputs of the first beams, best first
(`finish`). A beam preempted for blocks takes its whole group along and the search restarts from the prompt later
(`restart`): beams are deterministic, so the result is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hayabusa.engine.core.sequence import Sequence
from hayabusa.engine.decoding.beam_search import BeamSearch, BeamStep, beam_logprobs
from hayabusa.engine.sample.grammars import grammar_masks
from hayabusa.engine.sample.ops import allowed_tokens
from hayabusa.engine.sampling_params import eos_token_ids


class BeamGroup:
    def __init__(self, seqs: list[Sequence], model_eos_token_id: int | None, device: torch.device) -> None:
        self.seqs = seqs  # beam slot i -> seqs[i]; seqs[0] computes the prompt
        self.params = seqs[0].params
        self._model_eos = model_eos_token_id
        self._eos_token_ids = eos_token_ids(self.params, model_eos_token_id)
        self._device = device
        self.search = BeamSearch.from_params(self.params, self._eos_token_ids, device)
        self._start_grammar = seqs[0].output.grammar  # structured outputs: the grammar at its start, else None
        self._grammars = self._restarted_grammars()  # beam slot i's place in the grammar
        for seq in seqs:
            seq.beam_group = self

    @property
    def started(self) -> bool:
        """Whether the beams have tokens of their own (the prompt's step was scored)."""
        return self.search.steps > 0

    @property
    def scored_seqs(self) -> list[Sequence]:
        """The sequences whose last-token logits the next step scores, in the order `score` takes them."""
        return self.seqs if self.started else self.seqs[:1]

    def score(self, logits: Tensor) -> BeamStep:
        """logits [rows, vocab] of scored_seqs (device) -> the search's next step (one host sync)."""
        token_lists = [seq.token_ids for seq in self.scored_seqs]
        allowed = None
        if self._grammars is not None:
            masks = grammar_masks([(grammar, row) for row, grammar in enumerate(self._grammars[:len(token_lists)])],
                                  len(token_lists))
            allowed = allowed_tokens(torch.from_numpy(masks).to(logits.device), logits.shape[-1])
        return self.search.step(beam_logprobs(logits, self.params, token_lists, self.search.steps, self._model_eos,
                                              allowed))

    def advance(self, step: BeamStep) -> None:
        """Beam slot i continues parent step.parents[i] with step.tokens[i]: its tokens become the parent's plus that
        token (every parent's tokens are read before any beam's change). The scheduler gives each beam its parent's
        KV blocks and device row (Scheduler.update_from_outputs)."""
        tokens = [list(self.seqs[parent].token_ids) for parent in step.parents]
        for seq, token_ids, token in zip(self.seqs, tokens, step.tokens, strict=True):
            seq.token_ids = token_ids + [token]
        if self._grammars is not None:
            # A beam whose token its grammar refuses (picked at -inf when fewer tokens are allowed than beams run) is
            # failed: its grammar allows nothing from then on, so it never ranks above a live one.
            self._grammars = [self._grammars[parent].copy() for parent in step.parents]
            for grammar, token in zip(self._grammars, step.tokens, strict=True):
                grammar.accept(token)

    def finish(self) -> list[Sequence]:
        """Put the best num_return_sequences hypotheses into the first beams' outputs (best first; each output's
        score is transformers' sequences_scores); returns those sequences."""
        best = self.search.results(self.params.num_return_sequences)
        for seq, hypothesis in zip(self.seqs, best, strict=False):
            seq.token_ids = seq.token_ids[: seq.num_prompt_tokens] + hypothesis.token_ids
            for token in hypothesis.token_ids:
                seq.output.append(token)
            seq.output.score = hypothesis.score
        return self.seqs[: len(best)]

    def restart(self) -> None:
        """Back to the prompt (the group was preempted): every beam's tokens, and a fresh search."""
        for seq in self.seqs:
            del seq.token_ids[seq.num_prompt_tokens:]
        self.search = BeamSearch.from_params(self.params, self._eos_token_ids, self._device)
        self._grammars = self._restarted_grammars()

    def _restarted_grammars(self) -> list | None:
        start = self._start_grammar
        return [start.restarted() for _ in self.seqs] if start is not None else None
