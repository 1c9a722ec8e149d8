"""Continuous batching: which sequences run in the next step, and what happens when KV blocks run out.

Each step is either a prefill (waiting sequences, oldest first, up to a token budget) or a decode (every running
sequence, one token each). Prefills go first so new requests join while others decode. When a running sequence
needs a block and none is free, the newest running sequence is preempted: its blocks are released and it goes
back to the front of the queue to be recomputed (prompt + tokens so far) later. Nothing is dropped, and the
oldest sequence always makes progress, because any single request is checked to fit the whole pool when added.

The host reads sampled tokens back one step behind the device, so a plan is made while the previous step's
tokens are still in flight (`SlotTable.num_tokens` counts them):
- a sequence that stopped on eos or a stop string in that step rides along once more; its row is dropped when
  its result is read (`postprocess`), and its blocks are freed then, which is safe because the device runs
  steps in order;
- max_new_tokens is counted on the host: a row whose in-flight token is its last gets position -1 (nothing to
  compute) instead of a token past the limit;
- preemption needs every token known (a recomputed sequence re-prefills its tokens): when blocks run short,
  `schedule` returns None and the engine reads the in-flight step back first, so preemption sees exactly what an
  engine without the lag would see.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.config import check_context_fits
from hayabusa.engine.sequence import Sequence, SequenceStatus
from hayabusa.engine.slots import NO_MOVES, SlotTable, needs_general_sampler

NON_FINITE_ERROR = "the model produced non-finite logits (NaN or inf) for this request"
Deliver = Callable[[Sequence, "int | None", str], None]  # (sequence, its new token or None, its text delta)


def _ignore(seq: Sequence, token: int | None, delta: str) -> None:
    pass


@dataclass
class StepPlan:
    """One step's work. Row r of the step is slot first_slot + r."""

    is_prefill: bool
    seqs: list[Sequence]  # one per row; prefill: the newly admitted sequences; decode: every running slot in order
    first_slot: int
    # Tokens each row samples this step: bool [rows] today (0 or 1); a count with speculation, 0 for a prefill chunk.
    tokens_per_row: np.ndarray
    positions: np.ndarray | None  # decode: int64 [rows], the position each row writes, -1 for a row with none
    new_blocks: list[tuple[int, int, int]]  # decode: (slot, column, block id) entries the block table gains
    greedy_only: bool  # every row is served by the greedy fast path
    # (destination slots, source slots) whose device rows must be copied before this step (SlotTable.take_moves)
    slot_moves: tuple[list[int], list[int]] = NO_MOVES

    def __post_init__(self) -> None:
        self.num_rows = len(self.seqs)
        self.num_sampling_rows = int(np.count_nonzero(self.tokens_per_row))
        self.has_work = self.num_sampling_rows > 0  # else nothing is launched


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_model_len:
            # A recomputed sequence may hold up to max_model_len tokens and must fit one prefill batch.
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                             f"({max_model_len})")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # admission order, oldest first (an ordered set)
        self.slots = SlotTable(max_num_seqs, block_manager.block_size)

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ValueError for a request that could never run: past the context, or bigger than the KV pool."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty; at least one token is needed")
        check_context_fits(num_prompt_tokens, max_new_tokens, self.max_model_len)
        # The last sampled token is never written to the cache.
        blocks = self.block_manager.blocks_needed(num_prompt_tokens + max_new_tokens - 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"{num_prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} need {blocks} KV "
                             f"blocks of {self.block_manager.block_size} tokens; the pool holds only "
                             f"{self.block_manager.num_blocks} (raise kv_cache_blocks or lower max_new_tokens)")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.params.max_new_tokens)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning --------------------------------------------------------------------------------------------

    def schedule(self, results_in_flight: bool = False) -> StepPlan | None:
        """The next step, with block tables and slots ready for it; its sampled tokens count as in flight from
        now on. None: blocks are short while results are in flight; read them back, then schedule again."""
        prefill = self._admit()
        if prefill:
            first_slot = prefill[0].slot
            self.slots.num_tokens[first_slot:first_slot + len(prefill)] += 1
            plan = StepPlan(True, prefill, first_slot, np.ones(len(prefill), dtype=bool), None, [],
                            greedy_only=not any(needs_general_sampler(seq.params) for seq in prefill))
        else:
            plan = self._schedule_decode(results_in_flight)
        if plan is not None and plan.has_work:  # an idle plan is not launched: its moves wait for the next one
            plan.slot_moves = self.slots.take_moves()
        return plan

    def _admit(self) -> list[Sequence]:
        prefill: list[Sequence] = []
        num_batched_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if num_batched_tokens + len(seq) > self.max_num_batched_tokens \
                    or not self.block_manager.can_allocate(seq):
                break  # FIFO: later requests wait behind the oldest one
            self.block_manager.allocate(seq)
            num_batched_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running[self.waiting.popleft()] = None
            self.slots.assign(seq)
            prefill.append(seq)
        return prefill

    def _schedule_decode(self, results_in_flight: bool) -> StepPlan | None:
        slots = self.slots
        num_tokens = slots.num_tokens[: slots.count]
        active = num_tokens < slots.max_tokens[: slots.count]
        # Writing position num_tokens - 1 needs a new block when it lies past the row's block table.
        rows = (active & (num_tokens > slots.capacity[: slots.count])).nonzero()[0].tolist()
        grown: list[tuple[Sequence, int]] = []
        if len(rows) <= self.block_manager.num_free_blocks:
            for row in rows:
                seq = slots.seqs[row]
                grown.append((seq, len(seq.block_table)))
                self.block_manager.append_block(seq)
                slots.capacity[row] += self.block_manager.block_size
        elif results_in_flight:
            return None
        else:
            grown = self._grow_or_preempt()
            num_tokens = slots.num_tokens[: slots.count]
            active = num_tokens < slots.max_tokens[: slots.count]
        positions = num_tokens * active - 1  # num_tokens - 1, or -1 for a row with nothing to compute
        num_tokens += active  # a view: updates the slot table
        new_blocks = [(seq.slot, column, seq.block_table[column]) for seq, column in grown]
        return StepPlan(False, slots.running(), 0, active, positions, new_blocks, greedy_only=slots.num_general == 0)

    def _grow_or_preempt(self) -> list[tuple[Sequence, int]]:
        """Blocks are short and every token is known: give each running sequence, oldest first, the block its next
        token needs, preempting the newest (or, if it is the newest, the sequence itself) until it fits."""
        grown: list[tuple[Sequence, int]] = []
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            while not self.block_manager.can_append(seq):
                if queue:
                    self.preempt(queue.pop())  # the newest gives way
                else:
                    self.preempt(seq)  # older sequences of this batch hold the blocks: seq gives way itself
                    break
            else:
                column = len(seq.block_table)
                self.block_manager.may_append(seq)
                if len(seq.block_table) > column:
                    grown.append((seq, column))
                    self.slots.capacity[seq.slot] = len(seq.block_table) * self.block_manager.block_size
        return grown

    # ---- leaving ---------------------------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and slot; it waits at the front of the queue and is recomputed when blocks allow."""
        if self.slots.num_tokens[seq.slot] != len(seq.token_ids):
            raise RuntimeError(f"sequence {seq.seq_id} has a sampled token in flight; read it back before preempting")
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request that is no longer wanted (aborted, or its stream was closed); frees its blocks. A token
        still in flight for it is discarded when read back."""
        if seq in self.running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        del self.running[seq]
        self.slots.release(seq)

    # ---- reading a step back ---------------------------------------------------------------------------------

    def publish_prefilled(self, plan: StepPlan) -> None:
        """Publish the full blocks of a launched prefill's tokens for prefix-cache hits. Safe before its results
        are read: a later step that hits them runs after this one on the device. (Never at planning time: a
        sequence of the same batch could hit a block before its KV exists.)"""
        for seq in plan.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_computed_blocks(seq, len(seq.token_ids))

    def postprocess(self, plan: StepPlan, token_ids: list[int], bad_rows: frozenset[int] = frozenset(),
                    deliver: Deliver = _ignore) -> None:
        """Apply a launched step's sampled tokens, calling deliver(sequence, token or None, text delta) for each
        sequence that got a token or failed. Publishes newly full blocks; frees finished sequences. bad_rows: rows
        whose logits were not finite; their requests fail alone. Rows of sequences that finished meanwhile are
        dropped."""
        block_size = self.block_manager.block_size
        if plan.num_sampling_rows == plan.num_rows:
            rows = zip(plan.seqs, token_ids, range(plan.num_rows), strict=True)
        else:
            rows = ((plan.seqs[row], token_ids[row], row) for row in plan.tokens_per_row.nonzero()[0].tolist())
        running, finished = SequenceStatus.RUNNING, SequenceStatus.FINISHED
        for seq, token, row in rows:  # once per sequence per step: kept lean
            if seq.status is not running:
                continue  # finished (eos, stop string, abort) after this step was planned: its row is stale
            if bad_rows and row in bad_rows:
                seq.fail("error", f"{NON_FINITE_ERROR} at completion token {seq.num_completion_tokens}")
                self._release(seq)
                deliver(seq, None, "")
                continue
            seq.token_ids.append(token)
            delta = seq.output.append(token)
            # Every token but the one just sampled now has its KV in the cache; a prefill's were published at launch.
            computed = len(seq.token_ids) - 1
            if computed % block_size == 0:
                self.block_manager.cache_computed_blocks(seq, computed)
            if seq.output.finish_reason is not None:
                seq.status = finished
                self._release(seq)
            deliver(seq, token, delta)
