"""Prefill attention over packed variable-length sequences, reading K/V of the whole context from the paged cache.

Sequence s owns rows cu_seqlens[s]..cu_seqlens[s+1]-1 of `qkv` (its n_s new tokens) and holds
context_lens[s] tokens after this call: a cached prefix of context_lens[s] - n_s tokens, then the new ones.
Two launches:
  1. `_write_kv_kernel`: rotate-half rotary on each new token's k, then k and v into its cache slot
     block_table[s, p // block_size] * block_size + p % block_size.
  2. `_prefill_attention_kernel`: flash attention (online softmax in fp32, exp2) of each block of BLOCK_M new
     queries, rotated in-kernel, over keys 0..p of its sequence — prefix and new tokens alike read back through
     the block table, so cached prefixes and chunked prefill need nothing special.
head_dim need not be a power of two: it is split into a power-of-two main part and a (masked) power-of-two tail,
e.g. 80 = 64 + 16, so the tensor-core dots waste no lanes on padding to 128.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hayabusa.kernels._attention_checks import check_prefill_arguments
from hayabusa.kernels._launch import cast_rounded, cdiv, check_triton_device, dot, interpreted_bf16, next_power_of_2
from hayabusa.kernels.rotary import apply_rotary_ref

LOG2E = 1.4426950408889634
WRITE_BLOCK_T = 32  # new tokens per cache-write program


@triton.jit
def _load_rotated(row_ptrs, row_mask, positions, offs_d, cos_ptr, sin_ptr,
                  HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr):
    """[R, C] fp32 tile of head vectors (row r starts at row_ptrs[r]) at dims offs_d, rotate-half applied.

    Dims >= HEAD_DIM and masked rows read as 0; dims >= 2 * ROT_HALF pass through unrotated.
    """
    first_half = offs_d < ROT_HALF
    in_rotary = offs_d < 2 * ROT_HALF
    partner = tl.where(first_half, offs_d + ROT_HALF, offs_d - ROT_HALF)  # lane i pairs with i +- h
    freq = tl.where(first_half, offs_d, offs_d - ROT_HALF)
    mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    rot_mask = row_mask[:, None] & in_rotary[None, :]
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(row_ptrs[:, None] + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    table = positions[:, None] * ROT_HALF + freq[None, :]  # cos/sin: [max_positions, ROT_HALF]
    cos = tl.load(cos_ptr + table, mask=rot_mask, other=1.0)
    sin = tl.load(sin_ptr + table, mask=rot_mask, other=0.0)
    sign = tl.where(first_half, -1.0, 1.0)
    return x * cos + sign[None, :] * x_partner * sin


@triton.jit
def _main_lanes_in_head(offs_main, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr):
    """[D_MAIN] mask of the main part's lanes that hold head dims. A head narrower than the 16-lane minimum dot
    (head_dim < 16) pads its main part: lanes >= HEAD_DIM belong to the next head (or lie past the tensor's end),
    so loads and stores must skip them. Wider heads fill the main part, and their loads stay unmasked."""
    if D_MAIN > HEAD_DIM:
        return offs_main < HEAD_DIM
    return tl.full([D_MAIN], 1, tl.int1)


@triton.jit(do_not_specialize=["block_table_stride"])  # the widest sequence sets it: no variant per width
def _write_kv_kernel(
    qkv_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr,
    block_table_stride,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROT_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    num_new = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if tile * BLOCK_T >= num_new:
        return
    prefix = tl.load(context_lens_ptr + seq) - num_new

    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # index among the sequence's new tokens
    offs_d = tl.arange(0, BLOCK_D)
    in_seq = offs_t < num_new
    positions = prefix + offs_t
    # qkv row: [NUM_HEADS, 3, HEAD_DIM]
    head_ptrs = qkv_ptr + (seq_start + offs_t).to(tl.int64) * (3 * NUM_HEADS * HEAD_DIM) + head * 3 * HEAD_DIM
    k = _load_rotated(head_ptrs + HEAD_DIM, in_seq, positions, offs_d, cos_ptr, sin_ptr, HEAD_DIM, ROT_HALF)
    mask = in_seq[:, None] & (offs_d < HEAD_DIM)[None, :]
    v = tl.load(head_ptrs[:, None] + 2 * HEAD_DIM + offs_d[None, :], mask=mask)

    pages = tl.load(block_tables_ptr + seq * block_table_stride + positions // PAGE_SIZE, mask=in_seq, other=0)
    slots = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
    cache_offsets = (slots * NUM_HEADS + head) * HEAD_DIM  # cache: [num_blocks, PAGE_SIZE, NUM_HEADS, HEAD_DIM]
    cache_offsets = cache_offsets[:, None] + offs_d[None, :]
    tl.store(k_cache_ptr + cache_offsets, cast_rounded(k, k_cache_ptr.dtype.element_ty, INTERPRETED_BF16), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


@triton.jit
def _attend_keys(
    q_main, q_tail, acc_main, acc_tail, running_max, running_sum,
    k_cache_ptr, v_cache_ptr, block_table_row, head, query_positions, key_start, key_end, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    """Fold keys key_start..key_end-1 into the running softmax; CAUSAL_MASK for tiles crossing the diagonal."""
    dtype = k_cache_ptr.dtype.element_ty
    offs_main = tl.arange(0, D_MAIN)
    main_in_head = _main_lanes_in_head(offs_main, HEAD_DIM, D_MAIN)
    for tile_start in range(key_start, key_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        in_range = keys < key_end
        # A tile may span several pages: each key finds its own page through the block table.
        pages = tl.load(block_table_row + keys // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
        rows = ((pages * PAGE_SIZE + keys % PAGE_SIZE) * NUM_HEADS + head) * HEAD_DIM  # [BLOCK_N]
        # K loaded transposed ([D, BLOCK_N]) for q @ k^T; V as [BLOCK_N, D].
        k_main = tl.load(k_cache_ptr + rows[None, :] + offs_main[:, None],
                         mask=in_range[None, :] & main_in_head[:, None], other=0.0)
        scores = dot(q_main, k_main, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INPUT_PRECISION, INTERPRETED_BF16)
        if D_TAIL > 0:
            offs_tail = D_MAIN + tl.arange(0, D_TAIL)
            tail_mask = in_range[None, :] & (offs_tail < HEAD_DIM)[:, None]
            k_tail = tl.load(k_cache_ptr + rows[None, :] + offs_tail[:, None], mask=tail_mask, other=0.0)
            scores = dot(q_tail, k_tail, scores, INPUT_PRECISION, INTERPRETED_BF16)
        scores = scores * scale_log2  # log2 units: exp2 replaces exp
        if CAUSAL_MASK:
            visible = (keys[None, :] <= query_positions[:, None]) & in_range[None, :]
            scores = tl.where(visible, scores, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        probs = cast_rounded(probs, dtype, INTERPRETED_BF16)
        v_main = tl.load(v_cache_ptr + rows[:, None] + offs_main[None, :],
                         mask=in_range[:, None] & main_in_head[None, :], other=0.0)
        acc_main = dot(probs, v_main, acc_main * correction[:, None], INPUT_PRECISION, INTERPRETED_BF16)
        if D_TAIL > 0:
            offs_tail = D_MAIN + tl.arange(0, D_TAIL)
            tail_mask = in_range[:, None] & (offs_tail < HEAD_DIM)[None, :]
            v_tail = tl.load(v_cache_ptr + rows[:, None] + offs_tail[None, :], mask=tail_mask, other=0.0)
            acc_tail = dot(probs, v_tail, acc_tail * correction[:, None], INPUT_PRECISION, INTERPRETED_BF16)
        running_max = new_max
    return acc_main, acc_tail, running_max, running_sum


@triton.jit(do_not_specialize=["block_table_stride"])
def _prefill_attention_kernel(
    qkv_ptr, out_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, k_cache_ptr, v_cache_ptr,
    cos_ptr, sin_ptr, block_table_stride, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    ROT_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
):
    # Query blocks in reverse: the longest (last, causal) blocks start first, which evens out the tail.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    num_new = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if q_block * BLOCK_M >= num_new:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix = context_len - num_new
    dtype = k_cache_ptr.dtype.element_ty

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the sequence's new tokens
    in_seq = offs_m < num_new
    query_positions = prefix + offs_m
    head_ptrs = qkv_ptr + (seq_start + offs_m).to(tl.int64) * (3 * NUM_HEADS * HEAD_DIM) + head * 3 * HEAD_DIM
    offs_main = tl.arange(0, D_MAIN)
    # q rotated in fp32 and rounded to the model dtype once, like the rotated k in the cache.
    q_main = cast_rounded(_load_rotated(head_ptrs, in_seq, query_positions, offs_main, cos_ptr, sin_ptr,
                                         HEAD_DIM, ROT_HALF), dtype, INTERPRETED_BF16)
    acc_main = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    if D_TAIL > 0:
        offs_tail = D_MAIN + tl.arange(0, D_TAIL)
        q_tail = cast_rounded(_load_rotated(head_ptrs, in_seq, query_positions, offs_tail, cos_ptr, sin_ptr,
                                             HEAD_DIM, ROT_HALF), dtype, INTERPRETED_BF16)
        acc_tail = tl.zeros([BLOCK_M, D_TAIL], dtype=tl.float32)
    else:
        q_tail = 0.0
        acc_tail = 0.0
    running_max = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

    block_table_row = block_tables_ptr + seq * block_table_stride
    # Keys 0..first_query_pos are visible to every row: whole tiles of them need no mask.
    first_query_pos = prefix + q_block * BLOCK_M
    unmasked_end = (first_query_pos + 1) // BLOCK_N * BLOCK_N
    key_end = tl.minimum(first_query_pos + BLOCK_M, context_len)
    acc_main, acc_tail, running_max, running_sum = _attend_keys(
        q_main, q_tail, acc_main, acc_tail, running_max, running_sum,
        k_cache_ptr, v_cache_ptr, block_table_row, head, query_positions, 0, unmasked_end, scale_log2,
        NUM_HEADS, HEAD_DIM, D_MAIN, D_TAIL, PAGE_SIZE, BLOCK_M, BLOCK_N, False, INPUT_PRECISION, INTERPRETED_BF16)
    acc_main, acc_tail, running_max, running_sum = _attend_keys(
        q_main, q_tail, acc_main, acc_tail, running_max, running_sum,
        k_cache_ptr, v_cache_ptr, block_table_row, head, query_positions, unmasked_end, key_end, scale_log2,
        NUM_HEADS, HEAD_DIM, D_MAIN, D_TAIL, PAGE_SIZE, BLOCK_M, BLOCK_N, True, INPUT_PRECISION, INTERPRETED_BF16)

    # out: [T, NUM_HEADS * HEAD_DIM]
    out_rows = out_ptr + (seq_start + offs_m).to(tl.int64) * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
    out_main = acc_main / running_sum[:, None]
    tl.store(out_rows[:, None] + offs_main[None, :], cast_rounded(out_main, dtype, INTERPRETED_BF16),
             mask=in_seq[:, None] & _main_lanes_in_head(offs_main, HEAD_DIM, D_MAIN)[None, :])
    if D_TAIL > 0:
        offs_tail = D_MAIN + tl.arange(0, D_TAIL)
        out_tail = acc_tail / running_sum[:, None]
        tl.store(out_rows[:, None] + offs_tail[None, :], cast_rounded(out_tail, dtype, INTERPRETED_BF16),
                 mask=in_seq[:, None] & (offs_tail < HEAD_DIM)[None, :])


@functools.cache
def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(main, tail) power-of-two widths covering head_dim: 80 -> (64, 16), 128 -> (128, 0), 200 -> (128, 128).

    Both are >= 16 (the smallest tensor-core dot); the tail is masked down to head_dim - main.
    """
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


@functools.cache
def attention_config(dtype: torch.dtype, head_dim: int) -> dict[str, int]:
    """Tile sizes and launch shape of the attention kernel.

    fp16/bf16 up to 128 padded lanes: 128 queries x 64 keys, 8 warps, 3 stages (the H100 sweet spot of Triton
    flash attention; no register spills at head_dim 80). Wider heads and fp32 (the exactness path) hold twice the
    bytes per lane, so they halve the tiles and the pipeline to stay within registers and shared memory.
    """
    d_main, d_tail = split_head_dim(head_dim)
    if dtype != torch.float32 and d_main + d_tail <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def prefill_attention(
    qkv: Tensor, positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
    k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, rotary_dims: int,
    max_seqlen_q: int | None = None, check_indices: bool = True, checked: bool = True,
) -> Tensor:
    """out [T, H*D]: causal attention of the T packed new tokens over their sequences' whole contexts.

    qkv [T, 3*H*D] (per head [q|k|v]); positions int32/int64 [T]; cu_seqlens int32 [S+1]; context_lens int32 [S];
    block_tables int32 [S, max_blocks_per_seq]; k_cache, v_cache [num_blocks, block_size, H, D];
    cos, sin float32 [max_positions, rotary_dims // 2]. Writes the rotated k and the v of the new tokens into the
    cache first. Raises ValueError before launch on any bad argument.
    max_seqlen_q: the longest sequence's new-token count (an upper bound works too), known to a caller that built
    cu_seqlens on the host; None reads it from cu_seqlens (a device sync). check_indices=False skips the check of
    every index value (another sync): only for a caller whose indices are valid by construction, since a bad one
    then reads or writes out of bounds. With both given, the launch reads nothing back from the device.
    checked=False skips every argument check (for a caller that checked them once for many calls) where
    max_seqlen_q is given; without it the checks run, as they also find the grid's size.
    """
    if checked or max_seqlen_q is None:
        max_new_tokens = check_prefill_arguments(qkv, positions, cu_seqlens, context_lens, block_tables, k_cache,
                                                 v_cache, cos, sin, rotary_dims, max_seqlen_q, check_indices)
        check_triton_device("qkv", qkv)
    else:
        max_new_tokens = max_seqlen_q
    return launch_prefill_attention(qkv, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin,
                                    rotary_dims, max_new_tokens)


def launch_prefill_attention(
    qkv: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
    cos: Tensor, sin: Tensor, rotary_dims: int, max_new_tokens: int,
) -> Tensor:
    """Launch the cache write and the attention on already-validated arguments; max_new_tokens sizes the grid."""
    num_tokens = qkv.shape[0]
    num_seqs = cu_seqlens.shape[0] - 1
    _, page_size, num_heads, head_dim = k_cache.shape
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return out
    common = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, ROT_HALF=rotary_dims // 2, PAGE_SIZE=page_size,
                  INTERPRETED_BF16=interpreted_bf16(qkv.dtype, qkv.device))

    grid = (cdiv(max_new_tokens, WRITE_BLOCK_T), num_heads, num_seqs)
    _write_kv_kernel[grid](
        qkv, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin, block_tables.stride(0),
        BLOCK_D=next_power_of_2(head_dim), BLOCK_T=WRITE_BLOCK_T, num_warps=4, **common,
    )

    d_main, d_tail = split_head_dim(head_dim)
    config = attention_config(qkv.dtype, head_dim)
    grid = (cdiv(max_new_tokens, config["BLOCK_M"]), num_heads, num_seqs)
    _prefill_attention_kernel[grid](
        qkv, out, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin,
        block_tables.stride(0), LOG2E / math.sqrt(head_dim),
        D_MAIN=d_main, D_TAIL=d_tail, INPUT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        **config, **common,
    )
    return out


def prefill_attention_ref(
    qkv: Tensor, positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
    k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, rotary_dims: int,
    max_seqlen_q: int | None = None, check_indices: bool = True, checked: bool = True,
) -> Tensor:
    """Plain-PyTorch `prefill_attention`: same arguments, output and cache writes; one sequence at a time (the
    arguments are always checked)."""
    check_prefill_arguments(qkv, positions, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin,
                            rotary_dims, max_seqlen_q, check_indices)
    _, page_size, num_heads, head_dim = k_cache.shape
    k_slots = k_cache.view(-1, num_heads, head_dim)  # [num_blocks * block_size, H, D]
    v_slots = v_cache.view(-1, num_heads, head_dim)
    out = torch.empty(qkv.shape[0], num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for seq, context_len in enumerate(context_lens.tolist()):
        start, end = bounds[seq], bounds[seq + 1]
        if start == end:
            continue
        new_positions = positions[start:end].long()  # context_len - n .. context_len - 1
        q, k, v = qkv[start:end].view(end - start, num_heads, 3, head_dim).unbind(2)  # each [n, H, D]
        cos_p, sin_p = cos[new_positions][:, None, :], sin[new_positions][:, None, :]
        q = apply_rotary_ref(q, cos_p, sin_p)
        k = apply_rotary_ref(k, cos_p, sin_p)

        def slots_of(token_positions: Tensor, seq: int = seq) -> Tensor:
            return block_tables[seq, token_positions // page_size].long() * page_size + token_positions % page_size

        new_slots = slots_of(new_positions)
        k_slots[new_slots] = k
        v_slots[new_slots] = v

        context_slots = slots_of(torch.arange(context_len, device=qkv.device))
        keys = k_slots.index_select(0, context_slots).float()  # [context_len, H, D]
        values = v_slots.index_select(0, context_slots).float()
        visible = torch.arange(context_len, device=qkv.device)[None, :] <= new_positions[:, None]  # [n, ctx]
        attended = F.scaled_dot_product_attention(  # fp32 scores, softmax and sum: [H, n, D]
            q.float().transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=visible)
        out[start:end] = attended.transpose(0, 1).reshape(end - start, -1).to(out.dtype)
    return out
