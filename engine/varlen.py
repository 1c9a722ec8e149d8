"""One varlen forward's inputs, packed on the host: prompt chunks, decode rows and whole prompts in one batch.

Sequence i of a batch computes counts[i] tokens from positions[i] on; its cached prefix (positions before) is read
from the KV pool through its block-table row `block_tables[slots[i]]`. Its input ids come from the host
(`host_tokens[i]`: a prompt chunk) or, for a decode row, from the device: the id the previous step sampled, which the
host has not read yet (`last_token[slots[i]]`). Logits are computed for the last new token of each sequence in
`logit_seqs`. The runner (engine.model_runner) uploads the fields in one copy and runs FastModel.prefill on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hayabusa.engine.staging import Field


@dataclass
class VarlenBatch:
    slots: np.ndarray  # int64 [S], ascending: the slot (block-table row, sampler row) of each sequence
    positions: np.ndarray  # int64 [S]: the first position each sequence computes
    counts: np.ndarray  # int64 [S], >= 1: the tokens each sequence computes
    host_tokens: dict[int, Sequence[int]]  # sequence index -> its counts[i] input ids; the others are decode rows
    logit_seqs: np.ndarray  # int64 [L]: the sequences whose last new token's logits are computed

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def num_device_tokens(self) -> int:
        return len(self.slots) - len(self.host_tokens)


def varlen_fields(batch: VarlenBatch, num_padded_tokens: int, num_logit_rows: int) -> list[Field]:
    """The upload fields of a batch whose T tokens run padded to num_padded_tokens and whose L logit rows run padded
    to num_logit_rows."""
    num_seqs, num_device = len(batch.slots), batch.num_device_tokens
    return [("input_ids", torch.int64, (num_padded_tokens,)), ("positions", torch.int32, (num_padded_tokens,)),
            ("cu_seqlens", torch.int32, (num_seqs + 1,)), ("context_lens", torch.int32, (num_seqs,)),
            ("slots", torch.int64, (num_seqs,)), ("last_token_rows", torch.int64, (num_logit_rows,)),
            ("logit_slots", torch.int64, (len(batch.logit_seqs),)),
            ("device_token_rows", torch.int64, (num_device,)), ("device_slots", torch.int64, (num_device,))]


def fill_varlen(host: dict[str, np.ndarray], batch: VarlenBatch) -> None:
    """Write a batch's inputs into host views of varlen_fields; padding tokens are computed, never attended."""
    num_tokens = batch.num_tokens
    cu_seqlens = host["cu_seqlens"]
    cu_seqlens[0] = 0
    np.cumsum(batch.counts, out=cu_seqlens[1:])
    starts = cu_seqlens[:-1]
    # Token t of sequence i sits at position positions[i] + (t - starts[i]).
    host["positions"][:num_tokens] = np.repeat(batch.positions - starts, batch.counts) + np.arange(num_tokens)
    host["positions"][num_tokens:] = 0
    input_ids = host["input_ids"]
    input_ids[num_tokens:] = 0
    device_seqs = np.ones(len(batch.slots), dtype=bool)
    for i, tokens in batch.host_tokens.items():
        input_ids[starts[i]:cu_seqlens[i + 1]] = tokens
        device_seqs[i] = False
    host["device_token_rows"][:] = starts[device_seqs]  # a decode row's one token
    host["device_slots"][:] = batch.slots[device_seqs]
    host["context_lens"][:] = batch.positions + batch.counts
    host["slots"][:] = batch.slots
    host["logit_slots"][:] = batch.slots[batch.logit_seqs]
    last_rows = host["last_token_rows"]
    num_logits = len(batch.logit_seqs)
    last_rows[:num_logits] = cu_seqlens[batch.logit_seqs + 1] - 1
    last_rows[num_logits:] = last_rows[num_logits - 1] if num_logits else 0  # padding rows: computed, never read
