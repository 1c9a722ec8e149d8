"""One request inside the paged engine: its tokens, status, block table, slot, sampling params and output."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from hayabusa.engine.sample.seeds import request_seed
from hayabusa.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hayabusa.engine.decoding.best_of import CandidateGroup
    from hayabusa.engine.decoding.paged_beams import BeamGroup
    from hayabusa.engine.outputs import OutputBuilder


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill: new, or preempted and waiting to recompute
    RUNNING = "running"  # holds blocks and a slot, decodes one token per step
    FINISHED = "finished"  # stopped (eos, stop string, length), failed or aborted; holds no blocks


class Delivery(enum.Enum):
    """Who takes a request's results: step()'s caller (add_request), a stream() reader, or generate()."""

    UPDATES = "updates"
    STREAM = "stream"
    RESULT = "result"


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, output: OutputBuilder,
                 delivery: Delivery = Delivery.RESULT, *, seed: int | None = None, request_id: int | None = None,
                 index: int = 0) -> None:
        self.seq_id = seq_id
        # A request of num_return_sequences completions runs as that many sequences (index 0, 1, ...), all under
        # the id of the first (best_of candidates too, renumbered best first when they all ended).
        self.request_id = seq_id if request_id is None else request_id
        self.index = index
        # Prompt then the completion tokens the host has read back. The last one is not in the KV cache yet; a
        # running sequence may also have a sampled token in flight, which only the engine's SlotTable counts.
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = request_seed(params) if seed is None else seed
        self.output = output
        self.delivery = delivery
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.slot = -1  # row of the engine's persistent per-sequence device state while running, else -1
        self.num_cached_tokens = 0  # leading tokens whose KV came from the prefix cache at the last allocation
        self.num_computed_tokens = 0  # while its prefill runs in chunks: leading tokens whose KV is computed
        # First prompt position whose logprob params.prompt_logprobs asks for (Engine.score starts at its
        # continuation): its prefill computes logits from the position before it on.
        self.score_from = 1
        self.prompt_scored = False  # its prompt logprobs are all computed (a recomputation does not redo them)
        self.num_preemptions = 0
        # The request's other completions, forked from this sequence when it is first admitted: its prefill serves
        # them all, and they share its prompt's KV blocks.
        self.fork_children: list[Sequence] = []
        self.beam_group: BeamGroup | None = None  # the request's beams, when it runs beam search (num_beams > 1)
        self.candidates: CandidateGroup | None = None  # the request's best_of candidates, when it ranks them
        self.text_deltas: list[str] = []  # produced but not yet taken by a stream() reader

    def fork(self, seq_id: int, seed: int, index: int | None = None) -> Sequence:
        """A child of this sequence's request with its prompt, its own seed and output (the scheduler admits it
        beside this one, sharing the prompt's KV blocks). index: which completion of the request it is (default:
        this one's)."""
        child = Sequence(seq_id, self.token_ids[: self.num_prompt_tokens], self.params, self.output.fork(),
                         self.delivery, seed=seed, request_id=self.request_id,
                         index=self.index if index is None else index)
        child.token_ids = list(self.token_ids)
        child.score_from = self.score_from
        child.prompt_scored = self.prompt_scored
        return child

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def scores_prompt(self) -> bool:
        """Its next prefill computes its prompt's logprobs (asked for, and not computed by an earlier prefill)."""
        return self.params.prompt_logprobs is not None and not self.prompt_scored

    @property
    def num_cacheable_tokens(self) -> int:
        """Leading tokens whose KV may come from the prefix cache: all but the last (its logits are needed), and
        when it scores its prompt, none from the position before its first scored one (those logits are needed)."""
        return self.score_from - 1 if self.scores_prompt else len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def error(self) -> str | None:
        return self.output.error

    def fail(self, reason: str, message: str) -> None:
        """Finish early: reason "abort" or "error", with message in the output's .error."""
        self.output.abort(reason, message)
        self.status = SequenceStatus.FINISHED
