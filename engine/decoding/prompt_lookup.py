"""Prompt-lookup drafting (transformers' `prompt_lookup_num_tokens`): guess a sequence's next tokens by finding its
trailing n-gram earlier in its own tokens and copying what followed there.

The guess costs no model: the engine checks it in one forward pass (engine.worker.model_runner, engine.sample.sampler.
sample_positions) and keeps the longest prefix the model agrees with, plus the model's own next token, so the output is
the one decoding token by token would give (greedy, and with seeded sampling too: position i of a draft check draws with
the noise of token STEP + i). Matching follows transformers' PromptLookupCandidateGenerator: n-gram sizes from
max_matching_ngram_size down to 1, the first (leftmost) occurrence whose continuation is not empty. (transformers also
cuts a draft before an eos id; here an eos among the checked drafts simply ends the request, so the output is the same.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from hayabusa.engine.core.block_manager import BlockManager
    from hayabusa.engine.core.slots import SlotTable

DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2  # transformers' default


def draft_tokens(tokens: Sequence[int], num_tokens: int, max_ngram_size: int) -> list[int]:
    """Up to num_tokens draft tokens to follow `tokens` (empty when nothing matches)."""
    length = len(tokens)
    if num_tokens < 1 or length < 2:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    for size in range(min(max_ngram_size, length - 1), 0, -1):
        windows = sliding_window_view(ids[:-1], size)  # every n-gram except the trailing one itself
        starts = np.flatnonzero((windows == ids[length - size:]).all(axis=1))
        if len(starts):
            start = int(starts[0]) + size  # the leftmost match whose continuation holds a token
            return ids[start:min(start + num_tokens, length)].tolist()
    return []


def draft_rows(slots: SlotTable, manager: BlockManager, decoding: np.ndarray, budget: int,
                new_blocks: list[tuple[int, int, int]]) -> dict[int, list[int]]:
    """row -> drafts of the decoding rows that ask for them (the scheduler calls this with every token known), cut
    to what max_new_tokens, `budget` tokens in all and the blocks that can be had allow. The blocks they need are
    appended to the rows' tables and their (slot, column, block id) entries to new_blocks."""
    drafts: dict[int, list[int]] = {}
    for row in np.flatnonzero(decoding).tolist():
        seq = slots.seqs[row]
        num_drafts = seq.params.prompt_lookup_num_tokens
        if not num_drafts or budget <= 0:
            continue
        length = len(seq.token_ids)  # the last one is the pass's first input, at position length - 1
        # A pass of d drafts emits up to d + 1 tokens; the last one ever sampled is never written to the cache.
        draft = draft_tokens(seq.token_ids, min(num_drafts, int(slots.max_tokens[row]) - length - 1, budget),
                             seq.params.max_matching_ngram_size or DEFAULT_MAX_MATCHING_NGRAM_SIZE)
        missing = manager.blocks_needed(length + len(draft)) - len(seq.block_table)
        if missing > manager.num_free_blocks:
            draft = draft[: int(slots.capacity[row]) - length]  # what the blocks it holds cover
        else:
            for _ in range(max(missing, 0)):
                new_blocks.append((row, len(seq.block_table), manager.append_block(seq)))
                slots.capacity[row] += manager.block_size
        budget -= len(draft)
        if draft:
            drafts[row] = draft
    return drafts
