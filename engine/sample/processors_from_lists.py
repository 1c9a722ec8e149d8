"""The processors' per-row tensors (RowProcessors, the seen-token mask) built from host token lists, for callers that
hold each row's tokens as a Python list: beam search (engine.decoding.beam_search), whose beams the processors see
after every step, and the reference loop (engine.oracle.reference_sampler). The paged engine keeps the same state on
the device per slot (engine.sample.sampler); both feed exactly the functions of engine.sample.logits_processors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hayabusa.engine.sample.logits_processors import bad_word_patterns, banned_tokens, padded_history, split_bad_words
from hayabusa.engine.sample.ops import RowProcessors
from hayabusa.engine.sampling_params import SamplingParams, eos_token_ids


def listed_processors(params: Sequence[SamplingParams], seen_tokens: Sequence[Sequence[int]], steps: Sequence[int],
                      eos_token_id: int | None, vocab: int, device: torch.device) -> RowProcessors:
    """The RowProcessors of rows whose tokens are seen_tokens[b] (prompt + generated), the last steps[b] of them
    generated."""
    def floats(name: str) -> Tensor:
        return torch.tensor([float(getattr(p, name)) for p in params], device=device)

    return RowProcessors(logit_bias=listed_bias(params, vocab, device),
                         generated_counts=listed_counts(seen_tokens, steps, vocab, device),
                         frequency_penalty=floats("frequency_penalty"), presence_penalty=floats("presence_penalty"),
                         banned=listed_bans(params, seen_tokens, steps, eos_token_id, vocab, device),
                         min_p=floats("min_p"), typical_p=floats("typical_p"))


def listed_bans(params: Sequence[SamplingParams], seen_tokens: Sequence[Sequence[int]], steps: Sequence[int],
                eos_token_id: int | None, vocab: int, device: torch.device) -> Tensor:
    """banned_tokens for host token lists: bool [B, V], True where no_repeat_ngram_size, bad_words_ids or
    min_new_tokens forbid the token (seen_tokens[b]: prompt + generated; steps[b]: tokens generated so far)."""
    eos = [eos_token_ids(p, eos_token_id) for p in params]
    words = [split_bad_words(p.bad_words_ids, e) for p, e in zip(params, eos, strict=True)]

    def ids_tensor(values: Sequence) -> Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return banned_tokens(
        history=padded_history(seen_tokens, max(map(len, seen_tokens)) + 1, device),
        lengths=ids_tensor([len(tokens) for tokens in seen_tokens]),
        ngram_sizes=ids_tensor([p.no_repeat_ngram_size for p in params]),
        patterns=ids_tensor([bad_word_patterns(multi) for _, multi in words]),
        num_patterns=ids_tensor([len(multi) for _, multi in words]),
        static_bans=seen_mask([single for single, _ in words], vocab, device), has_static_bans=ids_tensor([1]) > 0,
        eos_mask=seen_mask(eos, vocab, device), completion_lengths=ids_tensor(list(steps)),
        min_new_tokens=ids_tensor([p.min_new_tokens for p in params]))


def listed_bias(params: Sequence[SamplingParams], vocab: int, device: torch.device) -> Tensor:
    """float32 [B, V]: each row's logit_bias at its token ids, 0 elsewhere."""
    bias = torch.zeros(len(params), vocab)
    for b, p in enumerate(params):
        bias[b, list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()))
    return bias.to(device)


def listed_counts(seen_tokens: Sequence[Sequence[int]], steps: Sequence[int], vocab: int,
                  device: torch.device) -> Tensor:
    """float32 [B, V]: how often each token occurs among the last steps[b] tokens of seen_tokens[b]."""
    counts = torch.zeros(len(seen_tokens), vocab)
    for b, (tokens, num_generated) in enumerate(zip(seen_tokens, steps, strict=True)):
        generated = torch.tensor(list(tokens[len(tokens) - num_generated:]), dtype=torch.int64)
        counts[b].index_add_(0, generated, torch.ones(len(generated)))
    return counts.to(device)


def seen_mask(seen_tokens: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """bool [B, V]: True where row b's token list holds the token."""
    rows = [b for b, tokens in enumerate(seen_tokens) for _ in tokens]
    cols = [t for tokens in seen_tokens for t in tokens]
    mask = torch.zeros(len(seen_tokens), vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device)] \
        = True
    return mask
