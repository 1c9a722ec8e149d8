"""Continuous batching: which sequences run in the next step, and what happens when KV blocks run out.

Each step is either a prefill batch (waiting sequences, oldest first, up to a token budget) or a decode batch
(every running sequence, one token each). Prefills go first so new requests join while others decode. When a
running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
released and it goes back to the front of the queue to be recomputed (prompt + tokens so far) later. Nothing
is dropped, and the oldest sequence always makes progress, because any single request is checked to fit the
whole pool when it is added.
"""

from __future__ import annotations

from collections import deque

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.config import check_context_fits
from hayabusa.engine.sequence import Sequence, SequenceStatus


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
        self.running: deque[Sequence] = deque()

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

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next batch and whether it is a prefill; block tables are ready for it when this returns."""
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
            self.running.append(self.waiting.popleft())
            prefill.append(seq)
        if prefill:
            return prefill, True

        decode: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())  # the newest gives way
                else:
                    self.preempt(seq)  # older sequences of this batch hold the blocks: seq gives way itself
                    break
            else:
                self.block_manager.may_append(seq)
                decode.append(seq)
        self.running.extend(decode)
        return decode, False

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it waits at the front of the queue and is recomputed when blocks allow."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sequence's sampled token; publish newly computed full blocks; release finished ones."""
        finished = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            seq.append_token(token_id)
            # Every token but the one just sampled now has its KV in the cache.
            self.block_manager.cache_computed_blocks(seq, len(seq) - 1)
            if seq.is_finished:
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def abort(self, seq: Sequence) -> None:
        """Drop a request that is no longer wanted (e.g. its stream was closed); frees its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
