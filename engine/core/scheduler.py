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
where it enters the engine (engine.core.request_checks). A prompt's blocks are all allocated when it is admitted.

The host reads sampled tokens back one step behind the device, so a plan is made while the previous step's
tokens are still in flight (`SlotTable.num_tokens` counts them):
- a sequence that stopped on eos or a stop string in that step rides along once more; its row is dropped when
  its result is read (engine.core.output_processor), and its blocks are freed then (`update_from_outputs`), which
  is safe because the device runs steps in order;
- max_new_tokens is counted on the host: a row whose in-flight token is its last gets position -1 (nothing to
  compute) instead of a token past the limit;
- preemption needs every token known (a recomputed sequence re-prefills its tokens): when blocks run short,
  `schedule` returns None and the engine reads the in-flight step back first, so preemption sees exactly what an
  engine without the lag would see.

Forks: a request of n completions is admitted as one sequence plus n - 1 children forked from it at once (they
share its blocks and wait, computing nothing, while its prompt runs in chunks); the step that runs its last chunk
starts them too, sampling their first tokens from its logits with their own seeds. `fork` forks a running sequence
the same way at any later point. A fork writes into a shared block only after a copy-on-write (the plan's
`block_copies`), and a preempted child is recomputed alone, like any sequence.

Beam search (engine.decoding.paged_beams): a request of num_beams beams is admitted like one of num_beams completions,
but its beams are scored together: the prompt's last chunk gives the one row the search starts from, and every later
step feeds each beam the token the search appended (from the host: steps with beams are read back at once) and scores
all its rows. A beam preempted for blocks takes its whole group along; the search restarts from the prompt.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from hayabusa.engine.core.block_manager import BlockManager
from hayabusa.engine.core.sequence import Sequence, SequenceStatus
from hayabusa.engine.core.slots import SlotTable
from hayabusa.engine.core.step_plan import StepPlan
from hayabusa.engine.decoding.beam_search import BeamStep
from hayabusa.engine.decoding.paged_beams import BeamGroup
from hayabusa.engine.decoding.prompt_lookup import draft_rows
from hayabusa.engine.sample.grammars import grammar_masks

if TYPE_CHECKING:
    from hayabusa.engine.core.output_processor import StepOutputs


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
        self._fork_parent: dict[Sequence, Sequence] = {}  # children admitted with a parent still prefilling
        self.beam_groups: dict[BeamGroup, None] = {}  # running beam groups that started (admission order)

    def add(self, seq: Sequence) -> None:
        """Queue a new request: one sequence, with its other completions in seq.fork_children. It was checked where it
        entered the engine (engine.core.request_checks): it fits the context, the pool and max_num_seqs."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning --------------------------------------------------------------------------------------------

    def schedule(self, results_in_flight: bool = False) -> StepPlan | None:
        """The next step, with block tables and slots ready for it; its sampled tokens count as in flight from
        now on. None: blocks are short, or a request drafts (prompt lookup reads every token), while results are in
        flight; read them back, then schedule again."""
        slots = self.slots
        if results_in_flight and (slots.num_speculating or slots.num_beam_rows):
            return None
        grown = self._grow_decode_rows(results_in_flight)
        if grown is None:
            return None
        decoding, new_blocks, copies = grown
        drafts = draft_rows(slots, self.block_manager, decoding, self.max_num_batched_tokens - int(decoding.sum()),
                             new_blocks) if slots.num_speculating else {}
        chunks: list[tuple[Sequence, int, int]] = []
        admitted: list[int] = []
        if self.prefilling or self.waiting:
            num_decode_tokens = int(decoding.sum()) + sum(map(len, drafts.values()))
            chunks, admitted = self._plan_chunks(self.max_num_batched_tokens
                                                 - (num_decode_tokens if self.chunked_prefill else 0))
            if chunks and not self.chunked_prefill:
                decoding[:], drafts = False, {}  # the decode rows wait for the prefills
        if chunks or drafts or self.beam_groups:
            plan = self._mixed_plan(decoding, chunks, admitted, drafts, new_blocks)
        else:  # a decode step
            num_tokens = slots.num_tokens[: slots.count]  # a view: updates the slot table
            positions = num_tokens * decoding - 1  # decode rows write num_tokens - 1; -1: nothing to compute
            num_tokens += decoding
            plan = StepPlan(slots.running(), decoding, positions, new_blocks, slots.sampler_mode,
                            wants_logprobs=slots.num_logprob_rows > 0)
        if plan.has_work:  # an idle plan is not launched: its moves, loads and copies wait for the next one
            if slots.num_constrained:
                plan.grammar_masks = self._grammar_masks(plan)
            plan.slot_moves = slots.take_moves()
            plan.block_copies = copies
        elif copies:
            raise RuntimeError("a copy-on-write was planned for a step that launches nothing")
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
        forked_from: dict[int, int] = {}
        beams = [(group, [seq.slot for seq in group.seqs]) for group in self.beam_groups]
        scored: dict[int, tuple[int, int]] = {}
        prompt_ends: list[int] = []
        for seq, start, end in chunks:
            row = seq.slot
            positions[row], num_new_tokens[row] = start, end - start
            if seq.scores_prompt:  # position p's logits score prompt token p + 1
                first, last = max(start, seq.score_from - 1), min(end, seq.num_prompt_tokens - 1)
                if first < last or end == len(seq.token_ids):  # the last chunk always: it completes the list
                    scored[row] = (first, max(first, last))
            if end < len(seq.token_ids):
                continue
            # The prompt's last chunk samples (unless max_new_tokens is 0), and starts the children waiting on it.
            samples = int(slots.max_tokens[row] > end)
            tokens_per_row[row] = samples
            if seq.beam_group is not None:  # the search starts from this one row; the beams wait for it
                beams.append((seq.beam_group, [row]))
                seq.fork_children = []
                continue
            for child in seq.fork_children:
                forked_from[child.slot], tokens_per_row[child.slot] = row, samples
            if not samples:
                prompt_ends += [row, *(child.slot for child in seq.fork_children)]
            seq.fork_children = []
        for row in admitted:
            new_blocks += [(row, column, block_id) for column, block_id in enumerate(slots.seqs[row].block_table)]
        # A speculating row's exact count is set when its step is read back, which the engine does at once.
        num_tokens += np.minimum(tokens_per_row, 1)
        wants_logprobs = slots.num_logprob_rows > 0 and any(
            slots.seqs[row].params.wants_token_logprobs for row in np.flatnonzero(tokens_per_row).tolist())
        return StepPlan(slots.running(), tokens_per_row, positions, new_blocks, slots.sampler_mode, num_new_tokens,
                        sorted(seq.slot for seq, _, _ in chunks), admitted, drafts,
                        forked_from, dict(sorted(scored.items())), sorted(prompt_ends), beams,
                        wants_logprobs=wants_logprobs)

    def _grammar_masks(self, plan: StepPlan) -> np.ndarray | None:
        """The allowed tokens of the plan's sampling rows that have a grammar (every token of theirs is known: a step
        that sampled one was read back at once), or None when none samples. Beams are masked where their search scores
        them (engine.decoding.paged_beams)."""
        rows = [(seq.output.grammar, row) for row in np.flatnonzero(plan.tokens_per_row).tolist()
                if (seq := plan.seqs[row]).output.grammar is not None and seq.beam_group is None]
        return grammar_masks(rows, plan.num_rows) if rows else None

    def _plan_chunks(self, budget: int) -> tuple[list[tuple[Sequence, int, int]], list[int]]:
        """(sequence, first token, end) of each prompt chunk that fits `budget` tokens, continuing prefills first,
        then newly admitted sequences (FIFO); and the slots of the admitted ones."""
        chunks: list[tuple[Sequence, int, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            budget -= self._add_chunk(chunks, seq, budget)
        admitted: list[int] = []
        while budget > 0 and self.waiting:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.fork_children) > self.max_num_seqs \
                    or not self.block_manager.can_allocate(seq, seq.num_cacheable_tokens) \
                    or not self.chunked_prefill and len(seq) > budget:
                break  # FIFO: later requests wait behind the oldest one
            self.block_manager.allocate(seq, seq.num_cacheable_tokens)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens
            self.running[self.waiting.popleft()] = None
            self.prefilling[seq] = None
            admitted.append(self.slots.assign(seq))
            for child in seq.fork_children:  # they share its blocks and wait for its last chunk
                self._fork(seq, child)
                self._fork_parent[child] = seq
                admitted.append(child.slot)
            budget -= self._add_chunk(chunks, seq, budget)
        for seq, _, end in chunks:
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):
                del self.prefilling[seq]
                self.slots.prefilling[seq.slot] = False
                for child in seq.fork_children:
                    child.num_computed_tokens = end
                    self.slots.prefilling[child.slot] = False
                    del self._fork_parent[child]
        return chunks, admitted

    @staticmethod
    def _add_chunk(chunks: list[tuple[Sequence, int, int]], seq: Sequence, budget: int) -> int:
        start = seq.num_computed_tokens
        end = min(len(seq.token_ids), start + budget)
        chunks.append((seq, start, end))
        return end - start

    def _grow_decode_rows(self, results_in_flight: bool
                          ) -> tuple[np.ndarray, list[tuple[int, int, int]], list[tuple[int, int]]] | None:
        """(bool [rows]: the rows with a token to decode, the block-table entries they gain, the block copies to make
        first): every decode row whose next position lies past its block table gets a block, and a row forked since
        its last write a private copy of the block it writes if another row holds it too. When blocks are short:
        None while results are in flight, else preempt (_grow_or_preempt)."""
        slots = self.slots
        num_tokens = slots.num_tokens[: slots.count]
        decoding = self._decoding_rows()
        # Writing position num_tokens - 1 needs a new block when it lies past the row's block table.
        grows = decoding & (num_tokens > slots.capacity[: slots.count])
        rows = grows.nonzero()[0].tolist()
        shared_rows = [row for row in sorted(slots.may_share_write_block) if decoding[row] and not grows[row]] \
            if slots.may_share_write_block else []
        if len(rows) + len(shared_rows) > self.block_manager.num_free_blocks:
            if results_in_flight:
                return None
            grown, copies = self._grow_or_preempt()
            return self._decoding_rows(), [(seq.slot, column, seq.block_table[column]) for seq, column in grown], copies
        new_blocks, copies = [], []
        for row in rows:
            seq = slots.seqs[row]
            new_blocks.append((row, len(seq.block_table), self.block_manager.append_block(seq)))
            slots.capacity[row] += self.block_manager.block_size
        for row in shared_rows:
            seq, position = slots.seqs[row], int(num_tokens[row]) - 1
            copy = self.block_manager.copy_on_write(seq, position)
            if copy is not None:
                copies.append(copy)
                column = position // self.block_manager.block_size
                new_blocks.append((row, column, seq.block_table[column]))
        if slots.may_share_write_block:
            slots.may_share_write_block.difference_update(rows + shared_rows)
        return decoding, new_blocks, copies

    def _decoding_rows(self) -> np.ndarray:
        """bool [rows]: the rows with a token to decode (below their max_tokens, their prompt all computed)."""
        slots = self.slots
        return (slots.num_tokens[: slots.count] < slots.max_tokens[: slots.count]) & ~slots.prefilling[: slots.count]

    def _grow_or_preempt(self) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        """Blocks are short and every token is known: give each decoding sequence, oldest first, the block its next
        token needs (new, or a private copy of a shared one), preempting the newest (or, if it is the newest, the
        sequence itself) until it fits. Returns the (sequence, column) entries that changed and the block copies.
        Sequences still prefilling hold every block their tokens need already."""
        grown: list[tuple[Sequence, int]] = []
        copies: list[tuple[Sequence, tuple[int, int]]] = []
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            if seq.status is not SequenceStatus.RUNNING or self.slots.prefilling[seq.slot]:
                continue  # preempted along with its parent or beam group, or computing its prompt
            while seq.status is SequenceStatus.RUNNING and not self.block_manager.can_append(seq):
                if queue:
                    newest = queue.pop()  # the newest gives way (unless it left with its parent or group already)
                    if newest.status is SequenceStatus.RUNNING:
                        self.preempt(newest)
                else:
                    self.preempt(seq)  # older sequences of this batch hold the blocks: seq gives way itself
            if seq.status is SequenceStatus.RUNNING:
                column = len(seq.block_table)
                copy = self.block_manager.may_append(seq)
                self.slots.may_share_write_block.discard(seq.slot)
                if copy is not None:
                    copies.append((seq, copy))
                    grown.append((seq, (len(seq.token_ids) - 1) // self.block_manager.block_size))
                elif len(seq.block_table) > column:
                    grown.append((seq, column))
                    self.slots.capacity[seq.slot] = len(seq.block_table) * self.block_manager.block_size
        # A beam group preempted after some of its beams grew: their blocks went back (a freed copy target may be
        # another sequence's block by now), so only what running sequences got counts.
        running = SequenceStatus.RUNNING
        return ([(seq, column) for seq, column in grown if seq.status is running],
                [copy for seq, copy in copies if seq.status is running])

    # ---- forks -----------------------------------------------------------------------------------------------

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running[child] = None
        self.slots.fork(parent, child)

    # ---- leaving ---------------------------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and slot; it waits at the front of the queue and is recomputed when blocks allow. A
        sequence preempted while its prompt runs takes its waiting children along (they are forked again when it
        is admitted again); a waiting child preempted alone is recomputed alone."""
        if self.slots.num_tokens[seq.slot] != len(seq.token_ids):
            raise RuntimeError(f"sequence {seq.seq_id} has a sampled token in flight; read it back before preempting")
        if seq.beam_group is not None:
            self._preempt_beams(seq.beam_group)
            return
        self._detach_child(seq)
        for child in seq.fork_children:
            if child.status is SequenceStatus.RUNNING:
                del self._fork_parent[child]
                self._release(child)
                child.status = SequenceStatus.WAITING
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request that is no longer wanted (aborted, or its stream was closed); frees its blocks. A token
        still in flight for it is discarded when read back."""
        self._detach_child(seq)
        if seq.beam_group is not None:
            self.beam_groups.pop(seq.beam_group, None)
        if seq in self.running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt_beams(self, group: BeamGroup) -> None:
        """Free every beam of the group; it waits at the front of the queue as its prompt (with its other beams to
        fork again) and its search restarts."""
        self.beam_groups.pop(group, None)
        for seq in group.seqs:
            self._fork_parent.pop(seq, None)
            if seq.status is SequenceStatus.RUNNING:
                self._release(seq)
            seq.status = SequenceStatus.WAITING
        group.restart()
        first = group.seqs[0]
        first.fork_children = group.seqs[1:]
        first.num_preemptions += 1
        self.waiting.appendleft(first)

    def _detach_child(self, seq: Sequence) -> None:
        """A child waiting for its parent's prompt that leaves: its parent no longer starts it."""
        parent = self._fork_parent.pop(seq, None)
        if parent is not None:
            parent.fork_children.remove(seq)

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

    def update_from_outputs(self, plan: StepPlan, outputs: StepOutputs) -> None:
        """Bring blocks and slots up to date with what the output processor made of a read-back step, in the order it
        processed the rows: free the sequences that ended, publish newly full blocks for prefix-cache hits, give each
        beam its parent's blocks and device row, and shrink a draft-checking row's blocks to the tokens it kept (the
        rejected drafts' KV lies past its length, overwritten later; whole blocks of it are freed). A sequence's
        freed blocks are safe to hand out: the device runs steps in order."""
        for seq in outputs.prompts_ended:
            self._release(seq)
        for group, step in outputs.beam_steps:
            self._update_beams(group, step)
        manager, slots = self.block_manager, self.slots
        for seq, num_computed in outputs.grown:
            if num_computed:
                manager.cache_computed_blocks(seq, num_computed)
            if seq.is_finished:
                self._release(seq)
            elif plan.drafts:
                slots.num_tokens[seq.slot] = len(seq.token_ids)
                manager.trim(seq, manager.blocks_needed(len(seq.token_ids)))  # covers the next write
                slots.capacity[seq.slot] = len(seq.block_table) * manager.block_size

    def _update_beams(self, group: BeamGroup, step: BeamStep | None) -> None:
        """A group whose search ended (or failed) leaves; else each beam slot takes its parent's blocks by reference
        and its parent's device row (its block table above all), as it took its tokens (BeamGroup.advance)."""
        if step is None or step.done:
            self.beam_groups.pop(group, None)
            for seq in group.seqs:
                self._release(seq)
            return
        slots, manager = self.slots, self.block_manager
        parents = [group.seqs[parent] for parent in step.parents]
        slots.copy_rows([seq.slot for seq in group.seqs], [parent.slot for parent in parents])
        manager.reassign(group.seqs, parents)
        self.beam_groups[group] = None
        for seq in group.seqs:
            slot = seq.slot
            slots.num_tokens[slot] = len(seq.token_ids)
            slots.capacity[slot] = len(seq.block_table) * manager.block_size
            slots.may_share_write_block.add(slot)
