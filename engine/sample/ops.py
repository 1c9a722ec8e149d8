"""Batched next-token selection on the logits' device with no host sync (a CUDA graph can capture it).

Processing order follows transformers' generate, with OpenAI's options where vLLM puts them: logit_bias added to the
raw logits, then the penalties (repetition, then frequency and presence), the bans (no_repeat_ngram_size,
bad_words_ids, min_new_tokens), and, when sampling, the warpers: temperature, top-k, top-p, min-p, typical-p. A
greedy row takes the argmax after the bans; a sampled row the argmax after adding Gumbel noise (engine.sample.seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hayabusa.engine.sample.logits_processors import mask_min_p, mask_typical, penalize_generated
from hayabusa.engine.sample.seeds import gumbel_noise
from hayabusa.engine.sampling_params import SamplingParams


def effective_temperature(params: SamplingParams) -> float:
    """The temperature a sampler row holds: 0.0 marks a greedy row (do_sample off, or temperature 0)."""
    return 0.0 if params.greedy else params.temperature


@dataclass
class RowProcessors:
    """What the processors add to sample_rows, per row of its logits [B, V] (a row whose option is off comes out as
    it went in)."""

    logit_bias: Tensor  # float32 [B, V], added to the raw logits (logits_processors.logit_bias_rows)
    generated_counts: Tensor  # float32 [B, V]: each token's count among the generated ones (generated_counts)
    frequency_penalty: Tensor  # [B]
    presence_penalty: Tensor  # [B]
    banned: Tensor  # bool [B, V]: what the bans forbid (logits_processors.banned_tokens)
    min_p: Tensor  # [B], warpers after top-p
    typical_p: Tensor  # [B]


def sample_rows(logits: Tensor, *, temperature: Tensor, top_k: Tensor, top_p: Tensor, penalty: Tensor,
                seeds: Tensor, steps: Tensor, seen: Tensor, processors: RowProcessors | None = None,
                allowed: Tensor | None = None) -> Tensor:
    """logits [B, V] -> token ids int64 [B]; every setting is a per-row device tensor [B], seen is bool [B, V].

    temperature 0 marks a greedy row (argmax after the processors); processors None skips them. allowed (bool
    [B, V], allowed_tokens): the tokens a structured output's grammar allows, None for no constraint. No host sync
    and no data-dependent branch, so a CUDA graph can capture it. A penalty of 1.0 leaves a row exactly as it was
    (x / 1 and x * 1 are exact).
    """
    x = logits.float()
    if processors is not None:
        x = x + processors.logit_bias
    x = apply_penalty(x, seen, penalty)
    if processors is not None:
        x = penalize_generated(x, processors.generated_counts, processors.frequency_penalty,
                               processors.presence_penalty)
        x = x.masked_fill(processors.banned, -torch.inf)
    if allowed is not None:
        x = x.masked_fill(~allowed, -torch.inf)
    greedy = temperature == 0
    greedy_tokens = x.argmax(dim=-1)
    scaled = x / torch.where(greedy, 1.0, temperature)[:, None]
    scaled = mask_top_k_top_p(scaled, top_k, top_p)
    if processors is not None:
        scaled = mask_typical(mask_min_p(scaled, processors.min_p), processors.typical_p)
    sampled = (scaled + gumbel_noise(seeds, steps, x.shape[-1])).argmax(dim=-1)  # Gumbel-max: a softmax draw
    return torch.where(greedy, greedy_tokens, sampled)


def apply_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """transformers' repetition penalty: a seen token's logit is divided by the penalty if positive, multiplied
    if negative; seen is a bool mask [B, V] (the device sampler keeps one per slot), penalty [B]."""
    penalized = torch.where(logits > 0, logits / penalty[:, None], logits * penalty[:, None])
    return torch.where(seen, penalized, logits)


def mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits: [B, V]; top_k: [B] int (0 = off); top_p: [B] float (1 = off). Removed entries become -inf."""
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    # top-k: keep logits >= the k-th largest (ties kept, as transformers does).
    kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
    keep = (logits >= kth) | (top_k[:, None] == 0)
    # top-p on what top-k kept: the smallest set of top tokens whose probability reaches top_p.
    sorted_kept = sorted_logits.masked_fill(sorted_logits < kth.where(top_k[:, None] > 0, -torch.inf), -torch.inf)
    probs = sorted_kept.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    in_nucleus = mass_before < top_p[:, None]
    in_nucleus[:, 0] = True
    cutoff = sorted_kept.masked_fill(~in_nucleus, torch.inf).min(dim=-1, keepdim=True).values
    keep &= logits >= cutoff
    return logits.masked_fill(~keep, -torch.inf)


def allowed_tokens(bitmask: Tensor, vocab_size: int) -> Tensor:
    """int32 bitmask [R, W] (engine.sample.grammars: bit t % 32 of word t // 32 for token t) -> bool [R, vocab]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]: an arithmetic shift keeps bit k at the bottom
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
