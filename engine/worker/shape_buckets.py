"""The finitely many shapes a step launches at (the triton op set), so that warm-up can compile every one.

A decode of n rows runs as the smallest graph batch size B >= n (`graph_batch_sizes`; CUDA graphs are captured per
B), the extra rows at position -1 (the kernels skip them); a prefill of T new tokens runs T padded to
prefill_bucket(T) (powers of two up to PREFILL_BUCKET_STEP, then its multiples), the extra rows computed but never
attended or read, and its LM head on its S sequences padded to a graph batch size.
"""

from __future__ import annotations

GRAPH_SMALL_BATCH_SIZES = (1, 2, 4, 8)
GRAPH_BATCH_STEP = 16  # beyond 8: 16, 32, 48, ... up to max_num_seqs
PREFILL_BUCKET_STEP = 256


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes, ascending, up to max_num_seqs included."""
    sizes = [b for b in GRAPH_SMALL_BATCH_SIZES if b < max_num_seqs]
    sizes += list(range(GRAPH_BATCH_STEP, max_num_seqs, GRAPH_BATCH_STEP))
    return sorted(set(sizes + [max_num_seqs]))


def prefill_bucket(num_tokens: int) -> int:
    """The token count a prefill of num_tokens >= 1 new tokens runs at (triton op set)."""
    if num_tokens <= PREFILL_BUCKET_STEP:
        return 1 << (num_tokens - 1).bit_length()
    return -(-num_tokens // PREFILL_BUCKET_STEP) * PREFILL_BUCKET_STEP


def prefill_buckets(max_tokens: int) -> list[int]:
    """Every prefill_bucket(t) for 1 <= t <= max_tokens, ascending."""
    return sorted({prefill_bucket(t) for t in range(1, max_tokens + 1)})
