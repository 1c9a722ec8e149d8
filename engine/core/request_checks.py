"""Whether a request can run, checked once where it enters: `Engine` and `PagedEngine`'s add_request, generate, stream
and score. The scheduler and everything after it trust what passed.

Two checks, because the API tells their failures apart: `check_request`, what the request is against the model (a
SamplingParams, a prompt of token ids in the vocabulary, option token ids in the vocabulary, prompt + max_new_tokens
within the context), which `Engine` raises before any work starts; and `check_capacity`, whether this engine can ever
hold it (its sequences at once, its KV blocks in the pool), a failure that comes back with the request alone. Errors
name the field and the limit; the caller prefixes which request it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq

from hayabusa.engine.sampling_params import SamplingParams


def check_token_ids(name: str, token_ids: Iterable[object], vocab_size: int) -> None:
    """Raise ValueError naming `name` when a token id is not an int in [0, vocab_size)."""
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} holds token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")


def check_context_fits(num_prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    """Raise ValueError when a prompt plus max_new_tokens runs past the model's positions (max_position_embeddings)."""
    total = num_prompt_tokens + max_new_tokens
    if total > context_length:
        alone = "; the prompt alone is longer than that" if num_prompt_tokens > context_length else ""
        raise ValueError(f"{num_prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} = {total} exceed the "
                         f"context length {context_length} (max_position_embeddings){alone}")


def check_request(prompt_ids: Seq[int], params: SamplingParams, *, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError for a request that no engine of this model could run (SamplingParams checked itself)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not prompt_ids:
        raise ValueError("the prompt is empty; at least one token is needed")
    check_token_ids("the prompt", prompt_ids, vocab_size)
    for name, ids in (("bad_words_ids", [t for word in params.bad_words_ids for t in word]),
                      ("eos_token_id", params.eos_token_id or ()), ("logit_bias", params.logit_bias)):
        check_token_ids(name, ids, vocab_size)
    check_context_fits(len(prompt_ids), params.max_new_tokens, max_model_len)


def check_score_pair(context: Seq[int], continuation: Seq[int]) -> None:
    """Raise ValueError for a score() pair whose context or continuation is empty (checked before check_request of
    context + continuation)."""
    if not context or not continuation:
        raise ValueError(f"the {'context' if not context else 'continuation'} is empty (the first token of a text has "
                         f"no logprob: give the context at least one token)")


def check_capacity(num_prompt_tokens: int, params: SamplingParams, *, max_num_seqs: int, num_blocks: int,
                   block_size: int) -> None:
    """Raise ValueError for a request this engine could never hold: more sequences (completions, best_of candidates
    or beams) than run at once, or more KV blocks than the pool has. Beams must fit the pool however far they diverge
    (a preempted group restarts from its prompt, so a group that fits only partly would never finish)."""
    num_sequences = max(params.num_candidates, params.num_beams)
    if num_sequences > max_num_seqs:
        name = "best_of" if params.ranks_candidates else "num_beams" if params.num_beams > 1 else "num_return_sequences"
        raise ValueError(f"{name} {num_sequences} is more than the {max_num_seqs} sequences the engine runs at once "
                         f"(max_num_seqs)")
    max_new_tokens = params.max_new_tokens
    blocks = -(-(num_prompt_tokens + max_new_tokens - 1) // block_size)  # the last sampled token is never cached
    if blocks > num_blocks:
        raise ValueError(f"{num_prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} need {blocks} KV "
                         f"blocks of {block_size} tokens; the pool holds only {num_blocks} (raise kv_cache_blocks "
                         f"or lower max_new_tokens)")
    if params.num_beams > 1:
        shared = num_prompt_tokens // block_size  # the prompt's full blocks
        beam_blocks = shared + params.num_beams * (blocks - shared)
        if beam_blocks > num_blocks:
            raise ValueError(f"num_beams {params.num_beams} with {num_prompt_tokens} prompt tokens + max_new_tokens "
                             f"{max_new_tokens} need up to {beam_blocks} KV blocks of {block_size} tokens; the pool "
                             f"holds only {num_blocks} (raise kv_cache_blocks, lower num_beams or max_new_tokens)")
