"""One varlen forward's inputs, packed on the host: prompt chunks, decode rows, draft checks and whole prompts in one
batch.

Sequence i of a batch computes counts[i] tokens from positions[i] on; its cached prefix (positions before) is read
from the KV pool through its block-table row `block_tables[slots[i]]`. Its input ids come from the host
(`host_tokens[i]`: a prompt chunk, or a draft check's last token and drafts) or, for a decode row, from the device:
the id the previous step sampled, which the host has not read yet (`last_token[slots[i]]`). Logits are computed for
the last logit_counts[i] new tokens of sequence i: its last one, or every position of a draft check (`drafts[i]`:
its draft tokens), or none; then one logit row per fork child (`forks`: it samples from the last new token of the
sequence it was forked from, with its own sampler row). Prompt logprobs: `scored` names the positions of prompt
chunks whose next token is scored. The runner (engine.worker.model_runner) uploads the fields in one copy and runs
PagedModel.prefill on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hayabusa.engine.worker.staging import Field


@dataclass
class VarlenBatch:
    slots: np.ndarray  # int64 [S], ascending: the slot (block-table row, sampler row) of each sequence
    positions: np.ndarray  # int64 [S]: the first position each sequence computes
    counts: np.ndarray  # int64 [S], >= 1: the tokens each sequence computes
    host_tokens: dict[int, Sequence[int]]  # sequence index -> its counts[i] input ids; the others are decode rows
    logit_counts: np.ndarray  # int64 [S]: how many of its last new tokens get logits (0, 1, or a pass's all)
    drafts: dict[int, Sequence[int]] = field(default_factory=dict)  # sequence index -> a draft check's drafts
    forks: list[tuple[int, int]] = field(default_factory=list)  # (sequence index of the parent, the child's slot)
    # (sequence index, first position, end position, the tokens at first + 1 .. end): scored prompt positions
    scored: list[tuple[int, int, int, Sequence[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def num_logits(self) -> int:
        return int(self.logit_counts.sum()) + len(self.forks)

    @property
    def num_device_tokens(self) -> int:
        return len(self.slots) - len(self.host_tokens)


def varlen_fields(batch: VarlenBatch, num_padded_tokens: int, num_padded_logit_rows: int) -> list[Field]:
    """The upload fields of a batch whose T tokens run padded to num_padded_tokens and whose L logit rows run padded
    to num_padded_logit_rows. With drafts, the draft checks' fields too: every sequence with logits is a pass (one
    without drafts checks none), and logit row r is position position_offset[r] of pass position_pass[r]."""
    num_seqs, num_device = len(batch.slots), batch.num_device_tokens
    num_logits = batch.num_logits
    fields = [("input_ids", torch.int64, (num_padded_tokens,)), ("positions", torch.int32, (num_padded_tokens,)),
              ("cu_seqlens", torch.int32, (num_seqs + 1,)), ("context_lens", torch.int32, (num_seqs,)),
              ("slots", torch.int64, (num_seqs,)), ("last_token_rows", torch.int64, (num_padded_logit_rows,)),
              ("logit_slots", torch.int64, (num_logits,)),
              ("device_token_rows", torch.int64, (num_device,)), ("device_slots", torch.int64, (num_device,))]
    if batch.drafts:
        fields += pass_fields(num_logits, int(np.count_nonzero(batch.logit_counts)) + len(batch.forks),
                              sum(len(draft) for draft in batch.drafts.values()))
    if batch.scored:
        fields += scored_fields(sum(len(targets) for *_, targets in batch.scored))
    return fields


def scored_fields(num_scored: int) -> list[Field]:
    """Prompt logprobs: the packed token row of each scored position and the prompt token it scores."""
    return [("scored_rows", torch.int64, (num_scored,)), ("scored_targets", torch.int64, (num_scored,))]


def pass_fields(num_logits: int, num_passes: int, num_drafts: int) -> list[Field]:
    """The draft checks' fields; their drafts travel flat (draft_index: pass * widest draft + place)."""
    return [("position_pass", torch.int64, (num_logits,)), ("position_offset", torch.int64, (num_logits,)),
            ("pass_slots", torch.int64, (num_passes,)), ("draft_tokens", torch.int64, (num_drafts,)),
            ("draft_index", torch.int64, (num_drafts,))]


def draft_width(batch: VarlenBatch) -> int:
    """The widest draft of a batch with draft checks: pass_drafts is [passes, draft_width] on the device."""
    return max(len(draft) for draft in batch.drafts.values())


def fill_varlen(host: dict[str, np.ndarray], batch: VarlenBatch) -> None:
    """Write a batch's inputs into host views of varlen_fields; padding tokens are computed, never attended."""
    num_tokens = batch.num_tokens
    cu_seqlens = host["cu_seqlens"]
    cu_seqlens[0] = 0
    np.cumsum(batch.counts, out=cu_seqlens[1:])
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    # Token t of sequence i sits at position positions[i] + (t - starts[i]).
    host["positions"][:num_tokens] = np.repeat(batch.positions - starts, batch.counts) + np.arange(num_tokens)
    host["positions"][num_tokens:] = 0
    input_ids = host["input_ids"]
    input_ids[num_tokens:] = 0
    device_seqs = np.ones(len(batch.slots), dtype=bool)
    for i, tokens in batch.host_tokens.items():
        input_ids[starts[i]:ends[i]] = tokens
        device_seqs[i] = False
    host["device_token_rows"][:] = starts[device_seqs]  # a decode row's one token
    host["device_slots"][:] = batch.slots[device_seqs]
    host["context_lens"][:] = batch.positions + batch.counts
    host["slots"][:] = batch.slots
    counts = batch.logit_counts
    num_seq_logits, num_logits = int(counts.sum()), batch.num_logits
    offsets = np.arange(num_seq_logits) - np.repeat(np.cumsum(counts) - counts, counts)  # index within its sequence
    fork_parents = np.array([parent for parent, _ in batch.forks], dtype=np.int64)
    fork_slots = np.array([child for _, child in batch.forks], dtype=np.int64)
    last_rows = host["last_token_rows"]
    last_rows[:num_seq_logits] = np.repeat(ends - counts, counts) + offsets
    last_rows[num_seq_logits:num_logits] = ends[fork_parents] - 1  # a child samples as its parent's last token
    last_rows[num_logits:] = last_rows[num_logits - 1] if num_logits else 0  # padding rows: computed, never read
    host["logit_slots"][:] = np.concatenate([np.repeat(batch.slots, counts), fork_slots])
    if batch.drafts:  # every sequence with logits is a pass (one without drafts checks none), and every fork child
        passes = np.flatnonzero(counts)
        host["position_pass"][:] = np.concatenate([np.repeat(np.arange(len(passes)), counts[passes]),
                                                   len(passes) + np.arange(len(fork_slots))])
        host["position_offset"][:] = np.concatenate([offsets, np.zeros(len(fork_slots), dtype=np.int64)])
        host["pass_slots"][:] = np.concatenate([batch.slots[passes], fork_slots])
        pass_of = {i: p for p, i in enumerate(passes.tolist())}
        width, cursor = draft_width(batch), 0
        for i, draft in batch.drafts.items():
            host["draft_tokens"][cursor:cursor + len(draft)] = draft
            host["draft_index"][cursor:cursor + len(draft)] = pass_of[i] * width + np.arange(len(draft))
            cursor += len(draft)
    cursor = 0
    for i, first, end, targets in batch.scored:  # position p of sequence i: token row starts[i] + p - positions[i]
        host["scored_rows"][cursor:cursor + end - first] = starts[i] - batch.positions[i] + np.arange(first, end)
        host["scored_targets"][cursor:cursor + end - first] = targets
        cursor += end - first
