"""StepPlan: the one thing the scheduler hands the worker, what one engine step computes and samples, row by row.

Row r is slot r (engine.core.slots): the running sequences in admission-compact order. The plan holds host integers
and arrays only (positions, token counts, block-table entries, row moves); the worker turns them into device inputs
(engine.worker.model_runner), and the output processor reads the same plan back with the step's sampled ids
(engine.core.output_processor).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from hayabusa.engine.core.sequence import Sequence
from hayabusa.engine.core.slots import NO_MOVES
from hayabusa.engine.decoding.paged_beams import BeamGroup
from hayabusa.engine.sample.sampler import SamplerMode


@dataclass
class StepPlan:
    """One step's work; row r is slot r (engine.core.slots).

    A decode step (num_new_tokens None) computes, for each row with a position >= 0, one token fed from the device
    (the id the previous step sampled). A mixed step computes num_new_tokens[r] tokens of row r from positions[r]
    on: a decode row its one token from the device; a row in `chunks` the tokens seq.token_ids[positions[r]:
    positions[r] + num_new_tokens[r]] from the host (a prompt chunk; it samples only when it reaches the end); a
    row in `drafts` its last token and its drafts from the host (a draft check); a row in `forked_from` computes
    nothing and samples from the logits of the row it was forked from (a fork child starting with its parent's last
    prompt chunk).
    """

    seqs: list[Sequence]  # every running slot in order
    # Tokens each row samples this step: 0 or 1; up to its drafts + 1 for a draft check (how many, its read-back
    # says); 0 for a prompt chunk short of its end.
    tokens_per_row: np.ndarray
    positions: np.ndarray  # int64 [rows]: the first position each row computes, -1 for a row with nothing to compute
    new_blocks: list[tuple[int, int, int]]  # (slot, column, block id) entries the block tables gain
    sampler_mode: SamplerMode  # the cheapest that serves every row (engine.sample.sampler)
    num_new_tokens: np.ndarray | None = None  # mixed steps: int64 [rows], tokens each row computes
    chunks: list[int] = field(default_factory=list)  # mixed steps: rows fed from the host, ascending
    admitted: list[int] = field(default_factory=list)  # mixed steps: rows whose sampler state loads this step
    # Mixed steps: row -> prompt-lookup draft tokens; the row feeds its last token and them from the host and
    # emits up to len + 1 tokens (a draft check, engine.decoding.prompt_lookup). The step is read back at once.
    drafts: dict[int, list[int]] = field(default_factory=dict)
    forked_from: dict[int, int] = field(default_factory=dict)  # mixed steps: child row -> the parent row it samples as
    # Mixed steps: chunk row -> (first, end): the positions whose next prompt token's logprob this step computes
    # (SamplingParams.prompt_logprobs), ascending by row.
    scored: dict[int, tuple[int, int]] = field(default_factory=dict)
    prompt_ends: list[int] = field(default_factory=list)  # mixed steps: rows whose prompt ends here, sampling nothing
    # Mixed steps: the beam groups this step scores, with their rows in BeamGroup.scored_seqs order. Once a group
    # started, its rows are fed from the host (the tokens the search appended) and sample nothing themselves.
    beams: list[tuple[BeamGroup, list[int]]] = field(default_factory=list)
    wants_logprobs: bool = False  # some sampling row's request wants its sampled tokens' logprobs
    # Structured outputs: int32 [rows, ceil(vocab / 32)], the tokens each row's grammar allows at the token it samples
    # (engine.sample.grammars; every token in rows without one); None when no sampling row has a grammar. Such a
    # step is read back at once: the next masks start from its tokens.
    grammar_masks: np.ndarray | None = None
    # (destination slots, source slots) whose device rows must be copied before this step (SlotTable.take_moves)
    slot_moves: tuple[list[int], list[int]] = NO_MOVES
    block_copies: Seq[tuple[int, int]] = ()  # (source, destination) KV blocks, copy-on-write before the step

    def __post_init__(self) -> None:
        self.num_rows = len(self.seqs)
        self.num_sampling_rows = int(np.count_nonzero(self.tokens_per_row))
        # Else nothing is launched. (A decode row computes exactly when it samples.)
        self.has_work = self.num_sampling_rows > 0 or self.is_mixed and bool(self.num_new_tokens.any())

    @property
    def is_mixed(self) -> bool:
        return self.num_new_tokens is not None
