"""The reference loop's next-token choice: the sampler's math (engine.sample.ops) on logits whose rows' settings and
token histories come as host lists, built per call (engine.sample.processors_from_lists) where the paged engine keeps
them on the device per slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hayabusa.engine.sample.ops import effective_temperature, sample_rows
from hayabusa.engine.sample.processors_from_lists import listed_processors, seen_mask
from hayabusa.engine.sampling_params import SamplingParams


def sample_next_tokens(logits: Tensor, params: Sequence[SamplingParams], seen_tokens: Sequence[Sequence[int]],
                       seeds: Sequence[int], steps: Sequence[int], eos_token_id: int | None = None) -> Tensor:
    """logits: [B, V] (any float dtype) -> next token ids, LongTensor [B] on the logits' device.

    The list-based entry of the reference loop: seen_tokens[b] (prompt + generated) feed the repetition penalty and
    the history rules, its last steps[b] tokens (the generated ones) the frequency and presence penalties; seeds[b]
    and steps[b] key the noise; eos_token_id is the model's (min_new_tokens forbids it, or params.eos_token_id).
    """
    batch, vocab = logits.shape
    if not len(params) == len(seen_tokens) == len(seeds) == len(steps) == batch:
        raise ValueError(f"logits hold {batch} rows but got {len(params)} params, {len(seen_tokens)} token lists, "
                         f"{len(seeds)} seeds, {len(steps)} steps")
    if all(p.greedy and p.repetition_penalty == 1.0 and not p.needs_processors for p in params):
        return logits.argmax(dim=-1)
    device = logits.device
    processors = None
    if any(p.needs_processors for p in params):
        processors = listed_processors(params, seen_tokens, steps, eos_token_id, vocab, device)
    return sample_rows(
        logits,
        temperature=torch.tensor([effective_temperature(p) for p in params], device=device),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        top_p=torch.tensor([p.top_p for p in params], device=device),
        penalty=torch.tensor([p.repetition_penalty for p in params], device=device),
        seeds=torch.tensor(list(seeds), dtype=torch.int64, device=device),
        steps=torch.tensor(list(steps), dtype=torch.int64, device=device),
        seen=seen_mask(seen_tokens, vocab, device),
        processors=processors,
    )
