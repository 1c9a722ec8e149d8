"""transformers' logits processors as batched tensor functions with per-row settings, for the device sampler.

Each function equals its transformers counterpart row by row (tests/sample/test_logits_processors.py checks the masks):
`ban_repeated_ngrams` = NoRepeatNGramLogitsProcessor, `ban_bad_word_completions` with a static single-token ban =
NoBadWordsLogitsProcessor, the eos gate of `banned_tokens` = MinNewTokensLengthLogitsProcessor, `mask_min_p` =
MinPLogitsWarper, `mask_typical` = TypicalLogitsWarper, `logit_bias_rows` = SequenceBiasLogitsProcessor with
single-token sequences (OpenAI's logit_bias). OpenAI's frequency and presence penalties, which transformers lacks,
are `generated_counts` and `penalize_generated`. A row whose setting is "off" comes out unchanged, so one launch
sequence serves a batch that mixes settings, and nothing reads a value back to the host (CUDA graphs can capture it).

Token history: the n-gram and bad-word rules look at each row's tokens so far, which the device knows before the
host does (the host reads sampled ids back one step late). They read a padded history tensor: row b holds
HISTORY_MARGIN sentinel columns, then its tokens (prompt and completion), then stale values past its length:
`history[b, HISTORY_MARGIN + i]` is token i. The sentinel never equals a token, so a comparison that reaches before
the first token never matches; columns past a row's length are masked by the row's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MAX_NO_REPEAT_NGRAM_SIZE = 8  # the n-gram width compared on the device (a fixed shape a CUDA graph can hold)
MAX_BAD_WORD_TOKENS = 16  # longest multi-token bad word
MAX_BAD_WORDS = 64  # multi-token bad words per request (single-token ones are a vocabulary mask: no limit)
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit); a row holds them in a fixed-width tensor
HISTORY_MARGIN = max(MAX_NO_REPEAT_NGRAM_SIZE, MAX_BAD_WORD_TOKENS) - 1
SENTINEL = -2  # history before the first token
WILDCARD = -1  # a bad-word pattern's left padding: matches anything


def split_bad_words(bad_words_ids: Sequence[Sequence[int]], eos_ids: Sequence[int]
                    ) -> tuple[list[int], list[tuple[int, ...]]]:
    """(single tokens always banned, multi-token words) of bad_words_ids. As transformers' NoBadWordsLogitsProcessor,
    a single-token word that is an eos id is dropped (eos stays allowed)."""
    single = sorted({word[0] for word in bad_words_ids if len(word) == 1 and word[0] not in eos_ids})
    multi = list(dict.fromkeys(tuple(word) for word in bad_words_ids if len(word) > 1))
    return single, multi


def bad_word_patterns(words: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each word right-aligned in MAX_BAD_WORD_TOKENS columns, WILDCARD on the left: [MAX_BAD_WORDS rows]."""
    rows = [[WILDCARD] * (MAX_BAD_WORD_TOKENS - len(word)) + list(word) for word in words]
    return rows + [[WILDCARD] * MAX_BAD_WORD_TOKENS] * (MAX_BAD_WORDS - len(rows))


def padded_history(token_lists: Sequence[Sequence[int]], width: int, device: torch.device) -> Tensor:
    """int64 [B, HISTORY_MARGIN + width]: the history layout above, built from host token lists."""
    history = torch.full((len(token_lists), HISTORY_MARGIN + width), SENTINEL, dtype=torch.int64)
    for b, tokens in enumerate(token_lists):
        history[b, HISTORY_MARGIN:HISTORY_MARGIN + len(tokens)] = torch.tensor(list(tokens), dtype=torch.int64)
    return history.to(device)


def _tail(history: Tensor, lengths: Tensor, size: int) -> Tensor:
    """The last `size` tokens of each row (SENTINEL before the first): int64 [B, size]."""
    columns = HISTORY_MARGIN + lengths[:, None] - size + torch.arange(size, device=history.device)
    return history.gather(1, columns)


def _scatter_bans(candidates: Tensor, hits: Tensor, vocab: int) -> Tensor:
    """bool [B, vocab]: True at candidates[b, i] wherever hits[b, i]; misses go to a spare column (dropped)."""
    mask = torch.zeros(candidates.shape[0], vocab + 1, dtype=torch.bool, device=candidates.device)
    mask.scatter_(1, torch.where(hits, candidates, vocab), True)
    return mask[:, :vocab]


def ban_repeated_ngrams(history: Tensor, lengths: Tensor, ngram_sizes: Tensor, vocab: int) -> Tensor:
    """NoRepeatNGramLogitsProcessor: bool [B, vocab], the tokens that would complete an n-gram seen before.

    history: the padded layout [B, HISTORY_MARGIN + W]; lengths int64 [B]; ngram_sizes int64 [B], 0 = off.
    """
    n_max = MAX_NO_REPEAT_NGRAM_SIZE
    width = history.shape[1] - HISTORY_MARGIN
    # windows[b, e] = tokens e - n_max + 1 .. e: each token e with the n_max - 1 tokens before it.
    windows = history[:, HISTORY_MARGIN - (n_max - 1):].unfold(1, n_max, 1)  # [B, W, n_max]
    tail = _tail(history, lengths, n_max - 1)  # [B, n_max - 1]
    # Only the last n - 1 columns of the prefix count for a row with n-grams of size n.
    ignored = torch.arange(n_max - 1, device=history.device)[None, :] < (n_max - ngram_sizes)[:, None]  # [B, n_max-1]
    matches = ((windows[:, :, :-1] == tail[:, None, :]) | ignored[:, None, :]).all(dim=-1)  # [B, W]
    # A window must end at a token the row has (e <= length - 1), and the row needs a whole n-gram of its own.
    inside = torch.arange(width, device=history.device)[None, :] < lengths[:, None]
    active = (ngram_sizes > 0) & (lengths >= ngram_sizes)
    return _scatter_bans(windows[:, :, -1], matches & inside & active[:, None], vocab)


def ban_bad_word_completions(history: Tensor, lengths: Tensor, patterns: Tensor, vocab: int) -> Tensor:
    """The multi-token part of NoBadWordsLogitsProcessor: bool [B, vocab], each pattern's last token where the row's
    tokens end with the rest of it. patterns: int64 [B, words, MAX_BAD_WORD_TOKENS] from bad_word_patterns."""
    prefixes, last = patterns[:, :, :-1], patterns[:, :, -1]
    tail = _tail(history, lengths, MAX_BAD_WORD_TOKENS - 1)  # [B, MAX_BAD_WORD_TOKENS - 1]
    matches = ((prefixes == tail[:, None, :]) | (prefixes == WILDCARD)).all(dim=-1)  # [B, words]
    return _scatter_bans(last, matches & (last >= 0), vocab)


def banned_tokens(*, history: Tensor, lengths: Tensor, ngram_sizes: Tensor, patterns: Tensor, num_patterns: Tensor,
                  static_bans: Tensor, has_static_bans: Tensor, eos_mask: Tensor, completion_lengths: Tensor,
                  min_new_tokens: Tensor) -> Tensor:
    """Every processor that forbids tokens, in one bool mask [B, vocab] (forbidding commutes, so one mask does).

    static_bans, eos_mask: bool [B, vocab] (read only where has_static_bans, resp. min_new_tokens > 0, so rows that
    never loaded them are ignored); completion_lengths: tokens generated so far, int64 [B].
    """
    vocab = static_bans.shape[1]
    banned = ban_repeated_ngrams(history, lengths, ngram_sizes, vocab)
    banned |= ban_bad_word_completions(history, lengths, patterns, vocab) & (num_patterns > 0)[:, None]
    banned |= static_bans & has_static_bans[:, None]
    banned |= eos_mask & (completion_lengths < min_new_tokens)[:, None]  # MinNewTokensLengthLogitsProcessor
    return banned


def mask_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """MinPLogitsWarper per row (min_p 0 = off): drop tokens less likely than min_p times the most likely one."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)  # min_tokens_to_keep = 1
    return logits.masked_fill(remove, -torch.inf)


def mask_typical(logits: Tensor, typical_p: Tensor) -> Tensor:
    """TypicalLogitsWarper per row (typical_p 1 = off): keep the tokens whose information is closest to the entropy,
    up to typical_p of the probability mass."""
    normalized = logits.log_softmax(dim=-1)
    p = normalized.exp()
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < typical_p[:, None]).sum(dim=1).clamp_(max=logits.shape[-1] - 1)
    sorted_remove = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    sorted_remove[:, 0] = False  # min_tokens_to_keep = 1
    remove = sorted_remove.scatter(1, order, sorted_remove)
    return torch.where((typical_p < 1.0)[:, None], logits.masked_fill(remove, -torch.inf), logits)


def logit_bias_rows(token_ids: Tensor, biases: Tensor, num_biases: Tensor, vocab: int) -> Tensor:
    """float32 [B, vocab]: each row's logit_bias at its token ids, 0 elsewhere (added to the logits).

    token_ids int64 and biases float32 [B, MAX_LOGIT_BIAS]: row b's first num_biases[b] entries (distinct ids) are
    its own; the rest may be stale and go to a spare column that is dropped.
    """
    used = torch.arange(token_ids.shape[1], device=token_ids.device)[None, :] < num_biases[:, None]
    dense = torch.zeros(token_ids.shape[0], vocab + 1, dtype=torch.float32, device=token_ids.device)
    dense.scatter_(1, torch.where(used, token_ids, vocab), biases)
    return dense[:, :vocab]


def generated_counts(history: Tensor, prompt_lengths: Tensor, lengths: Tensor, counted: Tensor, vocab: int) -> Tensor:
    """float32 [B, vocab]: how often each token occurs among row b's generated tokens, the history's tokens
    prompt_lengths[b] .. lengths[b] - 1 (the padded layout above). Rows where counted (bool [B]) is False come out
    0: only rows that loaded their history are read."""
    position = torch.arange(history.shape[1], device=history.device)[None, :] - HISTORY_MARGIN
    generated = (position >= prompt_lengths[:, None]) & (position < lengths[:, None]) & counted[:, None]  # [B, W]
    counts = torch.zeros(history.shape[0], vocab + 1, dtype=torch.float32, device=history.device)
    counts.scatter_add_(1, torch.where(generated, history, vocab), generated.to(torch.float32))
    return counts[:, :vocab]


def penalize_generated(logits: Tensor, counts: Tensor, frequency_penalty: Tensor, presence_penalty: Tensor) -> Tensor:
    """OpenAI's penalties per row (0 = off, an exact no-op): logits[j] -= frequency_penalty * counts[j] +
    presence_penalty * (counts[j] > 0), counts from generated_counts. logits, counts [B, vocab]; penalties [B]."""
    return logits - frequency_penalty[:, None] * counts - presence_penalty[:, None] * (counts > 0)
