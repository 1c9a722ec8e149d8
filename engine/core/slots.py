"""Slots: which running sequence sits in which row of the engine's persistent per-sequence device state.

Running sequences always hold rows 0..count-1 (compact), so a decode batch is simply the first `count` rows of
every per-slot tensor (last token, block table, sampling settings): no gather by slot id, nothing rebuilt. A
sequence that leaves (finished, preempted, aborted) hands its row to the one in the last row. The device copies
for such moves are batched: `take_moves` gives them to the runner, which applies them before its next launch, so
they land in stream order after any step still in flight.

Host mirrors per row (numpy, updated in place, never rebuilt): `num_tokens`, the tokens including a sampled token
still in flight (the next decode writes position num_tokens - 1); `max_tokens`, prompt + max_new_tokens (a row
whose num_tokens reached it has nothing left to compute: its last token is never written to the cache); and
`capacity`, the positions its block table covers (len(block_table) * block_size, kept by the scheduler);
`prefilling`, whether its prompt (or recomputed tokens) still has chunks to compute (or, for a fork child admitted
with its parent, whether the parent's prompt does); and the set `may_share_write_block`: rows forked (or forked
from) since their last write, whose next write may land in a block another row holds too, so the scheduler checks
it for a copy-on-write (a set: forks are rare, and an empty set costs a decode step nothing).
"""

from __future__ import annotations

import numpy as np

from hayabusa.engine.core.sequence import Sequence
from hayabusa.engine.sample.sampler import SamplerMode, row_mode

NO_MOVES: tuple[list[int], list[int]] = ([], [])


class SlotTable:
    def __init__(self, max_num_seqs: int, block_size: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.count = 0
        self.seqs: list[Sequence | None] = [None] * max_num_seqs
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self.max_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self.capacity = np.zeros(max_num_seqs, dtype=np.int64)
        self.prefilling = np.zeros(max_num_seqs, dtype=bool)  # its prompt is not all computed yet (no decoding)
        self.mode_counts = [0] * len(SamplerMode)  # running rows per sampler mode they need
        self.sampler_mode = SamplerMode.GREEDY  # the cheapest mode that serves every running row
        self.num_speculating = 0  # running rows with prompt-lookup speculation
        self.num_logprob_rows = 0  # rows whose sampled tokens' logprobs are computed (logprobs, best_of)
        self.num_beam_rows = 0  # rows of beam-search requests (engine.decoding.paged_beams)
        self.num_constrained = 0  # rows with structured outputs (their grammar masks are made each step)
        self.may_share_write_block: set[int] = set()
        self._moves: dict[int, int] = {}  # destination row -> source row whose device state it must receive

    def assign(self, seq: Sequence) -> int:
        """Give seq the next free row; its host counters start from the tokens it has now."""
        if self.count == self.max_num_seqs:
            raise RuntimeError(f"all {self.max_num_seqs} slots are taken")
        slot = self.count
        self.count += 1
        self.seqs[slot] = seq
        seq.slot = slot
        self.num_tokens[slot] = len(seq.token_ids)
        self.max_tokens[slot] = seq.num_prompt_tokens + seq.params.max_new_tokens
        self.capacity[slot] = len(seq.block_table) * self.block_size
        self.prefilling[slot] = True  # a new row computes its tokens (in chunks) before it decodes
        self._count_mode(seq, 1)
        return slot

    def fork(self, parent: Sequence, child: Sequence) -> int:
        """Give child, whose prompt and blocks are parent's, the next free row: the step that admits both loads it,
        and it waits (prefilling) until the scheduler starts it with its parent's last prompt chunk."""
        slot = self.assign(child)
        self.may_share_write_block.update((parent.slot, slot))
        return slot

    def copy_rows(self, destinations: list[int], sources: list[int]) -> None:
        """At the next launch, row destinations[i] receives the device state that row sources[i] holds or will hold
        by then (every source is read before any destination changes, so rows may trade or share content)."""
        pending = [self._moves.get(source, source) for source in sources]
        for destination, source in zip(destinations, pending, strict=True):
            if source != destination:
                self._moves[destination] = source

    def release(self, seq: Sequence) -> None:
        """Free seq's row; the sequence in the last row moves into it (host now, device at the next launch)."""
        slot, last = seq.slot, self.count - 1
        if not 0 <= slot <= last or self.seqs[slot] is not seq:
            raise RuntimeError(f"sequence {seq.seq_id} does not hold slot {slot}")
        seq.slot = -1
        self._count_mode(seq, -1)
        if slot != last:
            moved = self.seqs[last]
            self.seqs[slot], moved.slot = moved, slot
            self.num_tokens[slot] = self.num_tokens[last]
            self.max_tokens[slot] = self.max_tokens[last]
            self.capacity[slot] = self.capacity[last]
            self.prefilling[slot] = self.prefilling[last]
            # Chained moves compose: the row takes whatever the last row was itself still waiting to receive.
            self._moves[slot] = self._moves.pop(last, last)
        else:
            self._moves.pop(slot, None)  # nobody needs that row's pending content any more
        if self.may_share_write_block:
            self.may_share_write_block.discard(slot)
            if last in self.may_share_write_block:
                self.may_share_write_block.remove(last)
                self.may_share_write_block.add(slot)
        self.seqs[last] = None
        self.count -= 1

    def take_moves(self) -> tuple[list[int], list[int]]:
        """(destination rows, source rows) to copy on the device, each source read before any is written."""
        if not self._moves:
            return NO_MOVES
        moves, self._moves = self._moves, {}
        return list(moves), list(moves.values())

    def _count_mode(self, seq: Sequence, change: int) -> None:
        self.num_speculating += change * (seq.params.prompt_lookup_num_tokens is not None)
        self.num_logprob_rows += change * seq.params.wants_token_logprobs
        self.num_beam_rows += change * (seq.params.num_beams > 1)
        self.num_constrained += change * (seq.params.structured_outputs is not None)
        self.mode_counts[row_mode(seq.params)] += change
        self.sampler_mode = max((mode for mode in SamplerMode if self.mode_counts[mode]), default=SamplerMode.GREEDY)

    def running(self) -> list[Sequence]:
        return self.seqs[: self.count]
