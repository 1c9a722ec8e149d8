"""Continuous batching: which sequences run in the next step, and what happens when KV blocks run out.

Each step runs every running sequence that has a token to decode (one each), and, within the step's token budget
(max_num_batched_tokens, decode rows counted first), chunks of prompts: first the sequences whose prefill is under
way (oldest first), then waiting sequences, admitted in FIFO order while slots and blocks allow. A prompt longer
than what is left of the budget is split into chunks over several steps (chunked prefill): a long prompt never
stalls the running requests for more than one budget's worth of tokens. A step with any prefill chunk is a mixed
step (one varlen forward over decode rows and chunks); a step without one is a decode step (CUDA graphs). With
chunked_prefill=False a prompt is never split and a step with prefills runs no decode rows (the engine before
chunked prefill: new requests join at once, the others wait).

When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
released and it goes back to the front of the queue to be recomputed (prompt + tokens so far) later. Nothing is
dropped, and the oldest sequence always makes progress, because any single request is checked to fit the whole pool
when added. A prompt's blocks are all allocated when it is admitted.

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
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.config import check_context_fits
from hayabusa.engine.prompt_lookup import plan_drafts
from hayabusa.engine.sampler import SamplerMode
from hayabusa.engine.sequence import Sequence, SequenceStatus
from hayabusa.engine.slots import NO_MOVES, SlotTable

NON_FINITE_ERROR = "the model produced non-finite logits (NaN or inf) for this request"
Deliver = Callable[[Sequence, "Seq[int]", str], None]  # (sequence, its new tokens, its text delta)


def _ignore(seq: Sequence, tokens: Seq[int], delta: str) -> None:
    pass


@dataclass
class StepPlan:
    """One step's work; row r is slot r (engine.slots).

    A decode step (num_new_tokens None) computes, for each row with a position >= 0, one token fed from the device
    (the id the previous step sampled). A mixed step computes num_new_tokens[r] tokens of row r from positions[r]
    on: a decode row its one token from the device; a row in `chunks` the tokens seq.token_ids[positions[r]:
    positions[r] + num_new_tokens[r]] from the host (a prompt chunk; it samples only when it reaches the end); a
    row in `drafts` its last token and its drafts from the host (a verify pass).
    """

    seqs: list[Sequence]  # every running slot in order
    # Tokens each row samples this step: 0 or 1; up to its drafts + 1 for a verify pass (how many, its read-back
    # says); 0 for a prompt chunk short of its end.
    tokens_per_row: np.ndarray
    positions: np.ndarray  # int64 [rows]: the first position each row computes, -1 for a row with nothing to compute
    new_blocks: list[tuple[int, int, int]]  # (slot, column, block id) entries the block tables gain
    sampler_mode: SamplerMode  # the cheapest that serves every row (engine.sampler)
    num_new_tokens: np.ndarray | None = None  # mixed steps: int64 [rows], tokens each row computes
    chunks: list[int] = field(default_factory=list)  # mixed steps: rows fed from the host, ascending
    admitted: list[int] = field(default_factory=list)  # mixed steps: rows whose sampler state loads this step
    # Mixed steps: row -> prompt-lookup draft tokens; the row feeds its last token and them from the host and
    # emits up to len + 1 tokens (a verify pass, engine.prompt_lookup). The step is read back at once.
    drafts: dict[int, list[int]] = field(default_factory=dict)
    # (destination slots, source slots) whose device rows must be copied before this step (SlotTable.take_moves)
    slot_moves: tuple[list[int], list[int]] = NO_MOVES

    def __post_init__(self) -> None:
        self.num_rows = len(self.seqs)
        self.num_sampling_rows = int(np.count_nonzero(self.tokens_per_row))
        # Else nothing is launched. (A decode row computes exactly when it samples.)
        self.has_work = self.num_sampling_rows > 0 or self.is_mixed and bool(self.num_new_tokens.any())

    @property
    def is_mixed(self) -> bool:
        return self.num_new_tokens is not None


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, chunked_prefill: bool = True) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if not chunked_prefill and max_num_batched_tokens < max_model_len:
            # A recomputed sequence may hold up to max_model_len tokens and must fit one prefill batch.
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                             f"({max_model_len}) without chunked prefill")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # admission order, oldest first (an ordered set)
        self.prefilling: dict[Sequence, None] = {}  # running sequences whose tokens are not all computed yet
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
        now on. None: blocks are short, or a request drafts (prompt lookup reads every token), while results are in
        flight; read them back, then schedule again."""
        slots = self.slots
        if results_in_flight and slots.num_speculating:
            return None
        grown = self._grow_decode_rows(results_in_flight)
        if grown is None:
            return None
        decoding, new_blocks = grown
        drafts = plan_drafts(slots, self.block_manager, decoding, self.max_num_batched_tokens - int(decoding.sum()),
                             new_blocks) if slots.num_speculating else {}
        chunks: list[tuple[Sequence, int, int]] = []
        admitted: list[int] = []
        if self.prefilling or self.waiting:
            num_decode_tokens = int(decoding.sum()) + sum(map(len, drafts.values()))
            chunks, admitted = self._plan_chunks(self.max_num_batched_tokens
                                                 - (num_decode_tokens if self.chunked_prefill else 0))
            if chunks and not self.chunked_prefill:
                decoding[:], drafts = False, {}  # the decode rows wait for the prefills
        if chunks or drafts:
            plan = self._mixed_plan(decoding, chunks, admitted, drafts, new_blocks)
        else:  # a decode step
            num_tokens = slots.num_tokens[: slots.count]  # a view: updates the slot table
            positions = num_tokens * decoding - 1  # decode rows write num_tokens - 1; -1: nothing to compute
            num_tokens += decoding
            plan = StepPlan(slots.running(), decoding, positions, new_blocks, slots.sampler_mode)
        if plan.has_work:  # an idle plan is not launched: its moves wait for the next one
            plan.slot_moves = slots.take_moves()
        return plan

    def _mixed_plan(self, decoding: np.ndarray, chunks: list[tuple[Sequence, int, int]], admitted: list[int],
                    drafts: dict[int, list[int]], new_blocks: list[tuple[int, int, int]]) -> StepPlan:
        slots = self.slots
        tokens_per_row = np.zeros(slots.count, dtype=np.int64)  # admissions took the slots past the decode rows
        tokens_per_row[: len(decoding)] = decoding
        num_tokens = slots.num_tokens[: slots.count]  # a view: updates the slot table
        positions = num_tokens * (tokens_per_row > 0) - 1
        num_new_tokens = tokens_per_row.copy()
        for row, draft in drafts.items():  # the last token and the drafts; each position may emit a token
            num_new_tokens[row] = tokens_per_row[row] = len(draft) + 1
        for seq, start, end in chunks:
            positions[seq.slot], num_new_tokens[seq.slot] = start, end - start
            tokens_per_row[seq.slot] = end == len(seq.token_ids)  # the prompt's last chunk samples
        for row in admitted:
            new_blocks += [(row, column, block_id) for column, block_id in enumerate(slots.seqs[row].block_table)]
        # A speculating row's exact count is set when its step is read back, which the engine does at once.
        num_tokens += np.minimum(tokens_per_row, 1)
        return StepPlan(slots.running(), tokens_per_row, positions, new_blocks, slots.sampler_mode, num_new_tokens,
                        sorted(seq.slot for seq, _, _ in chunks), admitted, drafts)

    def _plan_chunks(self, budget: int) -> tuple[list[tuple[Sequence, int, int]], list[int]]:
        """(sequence, first token, end) of each prompt chunk that fits `budget` tokens, continuing prefills first,
        then newly admitted sequences (FIFO); and the slots of the admitted ones."""
        chunks: list[tuple[Sequence, int, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            budget -= self._add_chunk(chunks, seq, budget)
        admitted: list[int] = []
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq) or not self.chunked_prefill and len(seq) > budget:
                break  # FIFO: later requests wait behind the oldest one
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens
            self.running[self.waiting.popleft()] = None
            self.prefilling[seq] = None
            admitted.append(self.slots.assign(seq))
            budget -= self._add_chunk(chunks, seq, budget)
        for seq, _, end in chunks:
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):
                del self.prefilling[seq]
                self.slots.prefilling[seq.slot] = False
        return chunks, admitted

    @staticmethod
    def _add_chunk(chunks: list[tuple[Sequence, int, int]], seq: Sequence, budget: int) -> int:
        start = seq.num_computed_tokens
        end = min(len(seq.token_ids), start + budget)
        chunks.append((seq, start, end))
        return end - start

    def _grow_decode_rows(self, results_in_flight: bool) -> tuple[np.ndarray, list[tuple[int, int, int]]] | None:
        """(bool [rows]: the rows with a token to decode, the block-table entries they gain): every decode row whose
        next position lies past its block table gets a block. When blocks are short: None while results are in
        flight, else preempt (_grow_or_preempt)."""
        slots = self.slots
        num_tokens = slots.num_tokens[: slots.count]
        decoding = (num_tokens < slots.max_tokens[: slots.count]) & ~slots.prefilling[: slots.count]
        # Writing position num_tokens - 1 needs a new block when it lies past the row's block table.
        rows = (decoding & (num_tokens > slots.capacity[: slots.count])).nonzero()[0].tolist()
        if len(rows) > self.block_manager.num_free_blocks:
            if results_in_flight:
                return None
            grown = self._grow_or_preempt()
            decoding = (slots.num_tokens[: slots.count] < slots.max_tokens[: slots.count]) \
                & ~slots.prefilling[: slots.count]
            return decoding, [(seq.slot, column, seq.block_table[column]) for seq, column in grown]
        new_blocks = []
        for row in rows:
            seq = slots.seqs[row]
            new_blocks.append((row, len(seq.block_table), self.block_manager.append_block(seq)))
            slots.capacity[row] += self.block_manager.block_size
        return decoding, new_blocks

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
        self.prefilling.pop(seq, None)
        self.slots.release(seq)

    # ---- reading a step back ---------------------------------------------------------------------------------

    def publish_prefilled(self, plan: StepPlan) -> None:
        """Publish the full blocks of a launched step's prompt chunks for prefix-cache hits. Safe before its results
        are read: a later step that hits them runs after this one on the device. (Never at planning time: a
        sequence of the same batch could hit a block before its KV exists.)"""
        for row in plan.chunks:
            seq = plan.seqs[row]
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_computed_blocks(seq, seq.num_computed_tokens)

    def postprocess(self, plan: StepPlan, token_ids: list, bad_rows: frozenset[int] = frozenset(),
                    deliver: Deliver = _ignore) -> None:
        """Apply a launched step's sampled tokens, calling deliver(sequence, its new tokens, text delta) for each
        sequence that got tokens or failed. token_ids: one id per row; for a step with verify passes, each row's
        list of emitted ids. Publishes newly full blocks; frees finished sequences. bad_rows: rows whose logits were
        not finite; their requests fail alone. Rows of sequences that finished meanwhile are dropped."""
        if plan.drafts:
            self._postprocess_passes(plan, token_ids, bad_rows, deliver)
            return
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
                self._fail_non_finite(seq, deliver)
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
            deliver(seq, (token,), delta)

    def _fail_non_finite(self, seq: Sequence, deliver: Deliver) -> None:
        seq.fail("error", f"{NON_FINITE_ERROR} at completion token {seq.num_completion_tokens}")
        self._release(seq)
        deliver(seq, (), "")

    def _postprocess_passes(self, plan: StepPlan, row_tokens: list[list[int]], bad_rows: frozenset[int],
                            deliver: Deliver) -> None:
        """postprocess for a step with verify passes (read back at once, so nothing else is in flight): rows emit
        several tokens; a speculating row's token count and blocks shrink to what it kept (the rejected drafts'
        KV lies past its length, overwritten later; whole blocks of it are freed)."""
        manager, slots = self.block_manager, self.slots
        for row in plan.tokens_per_row.nonzero()[0].tolist():
            seq = plan.seqs[row]
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if row in bad_rows:
                self._fail_non_finite(seq, deliver)
                continue
            emitted, delta = [], ""
            for token in row_tokens[row]:
                seq.token_ids.append(token)
                emitted.append(token)
                delta += seq.output.append(token)
                if seq.output.finish_reason is not None:
                    break
            if row in plan.drafts:
                seq.output.count_verify_pass(len(plan.drafts[row]), len(row_tokens[row]) - 1)
            manager.cache_computed_blocks(seq, len(seq.token_ids) - 1)
            if seq.output.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
                self._release(seq)
            else:
                slots.num_tokens[seq.slot] = len(seq.token_ids)
                manager.trim(seq, manager.blocks_needed(len(seq.token_ids)))  # covers the next write
                slots.capacity[seq.slot] = len(seq.block_table) * manager.block_size
            deliver(seq, emitted, delta)
