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

Forks: a request of n completions is admitted as one sequence whose prefill also serves n - 1 children forked from
it (they share its blocks and sample their first tokens from its logits with their own seeds); `fork` forks a
running sequence the same way at any later point. A fork writes into a shared block only after a copy-on-write
(the plan's `block_copies`), and a preempted child is recomputed alone, like any sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.config import check_context_fits
from hayabusa.engine.logprobs import StepLogprobs
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
    wants_logprobs: bool = False  # some row's request wants its sampled tokens' logprobs
    # Prefill: rows (of sequences that compute) whose prompt logprobs this step computes (Sequence.scores_prompt).
    prompt_logprob_rows: Seq[int] = ()
    # Prefill: the last len(forked_from) rows are children forked at admission from these rows: they compute no
    # token of their own and sample from their parent's logits.
    forked_from: Seq[int] = ()
    # (destination slots, source slots) whose device rows must be copied before this step (SlotTable.take_moves)
    slot_moves: tuple[list[int], list[int]] = NO_MOVES
    settings_loads: Seq[Sequence] = ()  # running sequences whose sampler rows are reloaded
    block_copies: Seq[tuple[int, int]] = ()  # (source, destination) KV blocks, copy-on-write

    def __post_init__(self) -> None:
        self.num_rows = len(self.seqs)
        self.num_sampling_rows = int(np.count_nonzero(self.tokens_per_row))
        self.has_work = self.is_prefill or self.num_sampling_rows > 0  # else nothing is launched


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
        self._settings_loads: list[Sequence] = []  # forked after the last launch: their sampler rows need loading

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int, num_sequences: int = 1) -> None:
        """Raise ValueError for a request that could never run: past the context, bigger than the KV pool, or more
        completions than can run at once."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty; at least one token is needed")
        if num_sequences > self.max_num_seqs:
            raise ValueError(f"num_return_sequences {num_sequences} is more than the {self.max_num_seqs} sequences "
                             f"the engine runs at once (max_num_seqs)")
        check_context_fits(num_prompt_tokens, max_new_tokens, self.max_model_len)
        # The last sampled token is never written to the cache.
        blocks = self.block_manager.blocks_needed(num_prompt_tokens + max_new_tokens - 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"{num_prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} need {blocks} KV "
                             f"blocks of {self.block_manager.block_size} tokens; the pool holds only "
                             f"{self.block_manager.num_blocks} (raise kv_cache_blocks or lower max_new_tokens)")

    def add(self, seq: Sequence) -> None:
        """Queue a new request: one sequence, with its other completions in seq.fork_children."""
        self.check_fits(seq.num_prompt_tokens, seq.params.max_new_tokens, 1 + len(seq.fork_children))
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning --------------------------------------------------------------------------------------------

    def schedule(self, results_in_flight: bool = False) -> StepPlan | None:
        """The next step, with block tables and slots ready for it; its sampled tokens count as in flight from
        now on. None: blocks are short while results are in flight; read them back, then schedule again."""
        prefill, forked_from = self._admit()
        if prefill:
            first_slot = prefill[0].slot
            # A row samples unless its request asked for no new token (max_new_tokens 0: prompt logprobs only).
            samples = np.array([seq.num_completion_tokens < seq.params.max_new_tokens for seq in prefill])
            self.slots.num_tokens[first_slot:first_slot + len(prefill)] += samples
            num_computing = len(prefill) - len(forked_from)
            plan = StepPlan(True, prefill, first_slot, samples, None, [],
                            greedy_only=not any(needs_general_sampler(seq.params) for seq in prefill),
                            wants_logprobs=any(seq.params.logprobs is not None for seq in prefill),
                            prompt_logprob_rows=[row for row in range(num_computing) if prefill[row].scores_prompt],
                            forked_from=forked_from)
        else:
            plan = self._schedule_decode(results_in_flight)
        if plan is not None and plan.has_work:  # an idle plan is not launched: its moves wait for the next one
            plan.slot_moves = self.slots.take_moves()
            # Children that left before this launch (aborted) hold no row any more.
            plan.settings_loads = [seq for seq in self._settings_loads if seq.slot >= 0]
            self._settings_loads = []
        return plan

    def _admit(self) -> tuple[list[Sequence], list[int]]:
        """(the admitted sequences, then the children forked from them; the row each child was forked from)."""
        prefill: list[Sequence] = []
        parents: list[int] = []  # rows of admitted sequences with children to fork
        num_batched_tokens = num_children = 0
        while self.waiting:
            seq = self.waiting[0]
            if len(self.running) + num_children + 1 + len(seq.fork_children) > self.max_num_seqs \
                    or num_batched_tokens + len(seq) > self.max_num_batched_tokens \
                    or not self.block_manager.can_allocate(seq, seq.num_cacheable_tokens):
                break  # FIFO: later requests wait behind the oldest one
            self.block_manager.allocate(seq, seq.num_cacheable_tokens)
            num_batched_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running[self.waiting.popleft()] = None
            self.slots.assign(seq)
            if seq.fork_children:
                parents.append(len(prefill))
                num_children += len(seq.fork_children)
            prefill.append(seq)
        # Children take the rows after every admitted sequence, so the rows that compute stay contiguous.
        forked_from: list[int] = []
        for row in parents:
            parent = prefill[row]
            for child in parent.fork_children:
                self._fork(parent, child, copy_device_row=False)
                prefill.append(child)
                forked_from.append(row)
            parent.fork_children = []
        return prefill, forked_from

    # ---- forks -----------------------------------------------------------------------------------------------

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Fork a running sequence whose tokens are all known (none in flight) into children that continue from
        its tokens: each child shares its KV blocks (copy-on-write at the first write into a shared block) and its
        device rows (next input id, block table, seen tokens), and samples with its own seed from the next step on.
        Each child is a fresh Sequence with parent's token_ids, num_prompt_tokens and params."""
        if parent.status is not SequenceStatus.RUNNING:
            raise ValueError(f"sequence {parent.seq_id} is {parent.status.value}; only a running sequence forks")
        if self.slots.num_tokens[parent.slot] != len(parent.token_ids):
            raise RuntimeError(f"sequence {parent.seq_id} has a sampled token in flight; read it back before forking")
        if len(self.running) + len(children) > self.max_num_seqs:
            raise ValueError(f"{len(children)} children do not fit beside {len(self.running)} running sequences "
                             f"(max_num_seqs {self.max_num_seqs})")
        for child in children:
            if (child.token_ids, child.num_prompt_tokens, child.params) != \
                    (parent.token_ids, parent.num_prompt_tokens, parent.params):
                raise ValueError(f"fork child {child.seq_id} must hold the tokens, prompt length and params of "
                                 f"sequence {parent.seq_id}")
            self._fork(parent, child, copy_device_row=True)
            self._settings_loads.append(child)

    def _fork(self, parent: Sequence, child: Sequence, copy_device_row: bool) -> None:
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running[child] = None
        self.slots.fork(parent, child, copy_device_row=copy_device_row)

    def _schedule_decode(self, results_in_flight: bool) -> StepPlan | None:
        slots = self.slots
        num_tokens = slots.num_tokens[: slots.count]
        active = num_tokens < slots.max_tokens[: slots.count]
        # Writing position num_tokens - 1 needs a new block when it lies past the row's block table, and maybe a
        # private copy of its block when the row was forked since its last write.
        grows = active & (num_tokens > slots.capacity[: slots.count])
        rows = grows.nonzero()[0].tolist()
        shared_rows = [row for row in sorted(slots.may_share_write_block) if active[row] and not grows[row]] \
            if slots.may_share_write_block else []
        grown: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        if len(rows) + len(shared_rows) <= self.block_manager.num_free_blocks:
            for row in rows:
                seq = slots.seqs[row]
                grown.append((seq, len(seq.block_table)))
                self.block_manager.append_block(seq)
                slots.capacity[row] += self.block_manager.block_size
            for row in shared_rows:
                copy = self.block_manager.copy_on_write(slots.seqs[row], int(num_tokens[row]) - 1)
                if copy is not None:
                    copies.append(copy)
                    grown.append((slots.seqs[row], int(num_tokens[row] - 1) // self.block_manager.block_size))
            if slots.may_share_write_block:
                slots.may_share_write_block.difference_update(rows + shared_rows)
        elif results_in_flight:
            return None
        else:
            grown, copies = self._grow_or_preempt()
            num_tokens = slots.num_tokens[: slots.count]
            active = num_tokens < slots.max_tokens[: slots.count]
        positions = num_tokens * active - 1  # num_tokens - 1, or -1 for a row with nothing to compute
        num_tokens += active  # a view: updates the slot table
        new_blocks = [(seq.slot, column, seq.block_table[column]) for seq, column in grown]
        return StepPlan(False, slots.running(), 0, active, positions, new_blocks, greedy_only=slots.num_general == 0,
                        wants_logprobs=slots.num_logprob_rows > 0, block_copies=copies)

    def _grow_or_preempt(self) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        """Blocks are short and every token is known: give each running sequence, oldest first, the block its next
        token needs (new, or a private copy of a shared one), preempting the newest (or, if it is the newest, the
        sequence itself) until it fits. Returns the (sequence, column) entries that changed and the block copies."""
        grown: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
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
                copy = self.block_manager.may_append(seq)
                self.slots.may_share_write_block.discard(seq.slot)
                if copy is not None:
                    copies.append(copy)
                    grown.append((seq, (len(seq.token_ids) - 1) // self.block_manager.block_size))
                elif len(seq.block_table) > column:
                    grown.append((seq, column))
                    self.slots.capacity[seq.slot] = len(seq.block_table) * self.block_manager.block_size
        return grown, copies

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
                    deliver: Deliver = _ignore, logprobs: StepLogprobs | None = None) -> None:
        """Apply a launched step's sampled tokens, calling deliver(sequence, token or None, text delta) for each
        sequence that got a token or failed. Publishes newly full blocks; frees finished sequences. bad_rows: rows
        whose logits were not finite; their requests fail alone. Rows of sequences that finished meanwhile are
        dropped. logprobs: the step's logprobs, when its plan wanted any."""
        if plan.is_prefill and (plan.prompt_logprob_rows or plan.num_sampling_rows < plan.num_rows):
            self._apply_prefill_results(plan, bad_rows, logprobs, deliver)
        sampled = logprobs.sampled if logprobs is not None else None
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
            if sampled is not None and seq.output.logprobs is not None:
                seq.output.logprobs.append(sampled.entry(row, token, seq.params.logprobs))
            delta = seq.output.append(token)
            # Every token but the one just sampled now has its KV in the cache; a prefill's were published at launch.
            computed = len(seq.token_ids) - 1
            if computed % block_size == 0:
                self.block_manager.cache_computed_blocks(seq, computed)
            if seq.output.finish_reason is not None:
                seq.status = finished
                self._release(seq)
            deliver(seq, token, delta)

    def _apply_prefill_results(self, plan: StepPlan, bad_rows: frozenset[int], logprobs: StepLogprobs | None,
                               deliver: Deliver) -> None:
        """A prefill's prompt logprobs (forked children get their parent's), and the end of its requests that
        sample nothing (max_new_tokens 0)."""
        start = 0
        for row in plan.prompt_logprob_rows:
            seq = plan.seqs[row]
            scored = seq.token_ids[seq.score_from:seq.num_prompt_tokens]
            entries = logprobs.prompt.entries(start, scored, seq.params.prompt_logprobs) if scored else []
            start += len(scored)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if entries is None:
                seq.fail("error", f"{NON_FINITE_ERROR} in its prompt")
                self._release(seq)
                deliver(seq, None, "")
            else:
                seq.output.prompt_logprobs = [None] * seq.score_from + entries
        num_computing = plan.num_rows - len(plan.forked_from)
        for child, row in zip(plan.seqs[num_computing:], plan.forked_from, strict=True):
            child.output.prompt_logprobs = plan.seqs[row].output.prompt_logprobs
        for row in (plan.tokens_per_row == 0).nonzero()[0].tolist():
            seq = plan.seqs[row]
            if seq.status is SequenceStatus.RUNNING:
                if row in bad_rows:
                    seq.fail("error", NON_FINITE_ERROR)
                else:
                    seq.output.end_of_prompt()
                    seq.status = SequenceStatus.FINISHED
                self._release(seq)
                deliver(seq, None, "")
