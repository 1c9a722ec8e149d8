"""Paged decode attention: one new token per sequence, rotary + cache append + attention over its pages.

For each sequence b with position p = positions[b] (the sequence holds p + 1 tokens after this call):
  1. rotate-half rotary on the first `rotary_dims` of each head's q and k (fp32, rounded to the model dtype once),
  2. write the rotated k and the v into slot block_tables[b, p // block_size] * block_size + p % block_size,
  3. attend q over keys 0..p: keys 0..p-1 read from the paged cache, key p taken from registers (so the program
     never reads the slot it writes, and no ordering between the write and the reads is needed).
Online softmax in fp32. One program per (sequence, head) or, in the split-K (flash-decoding) variant, per
(sequence, head, split): each split covers a slice of the sequence's cached keys and writes an unnormalised
partial (running max, running sum, accumulator), then takes a ticket on its (sequence, head) counter; the split
that draws the last ticket merges the partials in split order (deterministic) inside the same launch, so split-K
costs no second kernel. Splitting happens only while (sequence, head) programs are too few to fill the GPU.
positions[b] < 0 marks a padding row (CUDA-graph batch padding): it writes nothing to the cache and its output
row is 0.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hayabusa.kernels._attention_checks import MAX_SPLITS, check_decode_arguments
from hayabusa.kernels._launch import (
    cast_rounded,
    cdiv,
    check_triton_device,
    device_limits,
    interpreted_bf16,
    next_power_of_2,
    pdl_meta,
    ticket_counters,
    uses_pdl,
    wait_for_prior_grid,
)
from hayabusa.kernels.rotary import apply_rotary_ref

MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost outweighs the parallelism it adds
PROGRAMS_PER_SM = 4  # (sequence, head) programs per SM that keep enough loads in flight without splitting
LOG2E = 1.4426950408889634


@triton.jit
def _rotated_head_vector(row_ptr, cos_row_ptr, sin_row_ptr, offs_d, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr):
    """Load one head's q or k ([BLOCK_D] lanes, HEAD_DIM real) and apply rotate-half rotary in fp32."""
    in_head = offs_d < HEAD_DIM
    in_rotary = offs_d < 2 * ROT_HALF
    first_half = offs_d < ROT_HALF
    # Lane i pairs with i + h (first half) or i - h (second half); both halves use frequency i mod h.
    partner = tl.where(first_half, offs_d + ROT_HALF, offs_d - ROT_HALF)
    freq = tl.where(first_half, offs_d, offs_d - ROT_HALF)
    x = tl.load(row_ptr + offs_d, mask=in_head, other=0.0).to(tl.float32)
    x_partner = tl.load(row_ptr + partner, mask=in_rotary, other=0.0).to(tl.float32)
    cos = tl.load(cos_row_ptr + freq, mask=in_rotary, other=1.0)
    sin = tl.load(sin_row_ptr + freq, mask=in_rotary, other=0.0)
    sign = tl.where(first_half, -1.0, 1.0)
    return x * cos + sign * x_partner * sin


# Block tables are as wide as the longest sequence outside CUDA graphs: their stride must not pick a variant.
@triton.jit(do_not_specialize=["block_table_row_stride"])
def _decode_attention_kernel(
    qkv_ptr, positions_ptr, block_tables_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr,
    out_ptr, partials_ptr, tickets_ptr,
    qkv_row_stride, block_table_row_stride, rotary_row_stride, scale_log2,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROT_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_prior_grid(PDL)  # qkv is the previous kernel's output
    position = tl.load(positions_ptr + seq).to(tl.int32)
    if position < 0:  # padding row: split 0 writes its zero output, no split takes a ticket
        if split == 0:
            offs = tl.arange(0, BLOCK_D)
            zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
            tl.store(out_ptr + seq * NUM_HEADS * HEAD_DIM + head * HEAD_DIM + offs,
                     zeros.to(out_ptr.dtype.element_ty), mask=offs < HEAD_DIM)
        return

    dtype = k_cache_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    token_stride = NUM_HEADS * HEAD_DIM  # cache: [num_blocks, PAGE_SIZE, NUM_HEADS, HEAD_DIM]
    block_table_row = block_tables_ptr + seq * block_table_row_stride

    # qkv row: [NUM_HEADS, 3, HEAD_DIM]; q and k rotated in fp32 and rounded to the model dtype once.
    head_row = qkv_ptr + seq * qkv_row_stride + head * 3 * HEAD_DIM
    cos_row = cos_ptr + position * rotary_row_stride
    sin_row = sin_ptr + position * rotary_row_stride
    q = cast_rounded(_rotated_head_vector(head_row, cos_row, sin_row, offs_d, HEAD_DIM, ROT_HALF), dtype,
                     INTERPRETED_BF16)
    k_new = cast_rounded(_rotated_head_vector(head_row + HEAD_DIM, cos_row, sin_row, offs_d, HEAD_DIM, ROT_HALF),
                         dtype, INTERPRETED_BF16)
    v_new = tl.load(head_row + 2 * HEAD_DIM + offs_d, mask=in_head, other=0.0)
    q = q.to(tl.float32) * scale_log2  # scores in log2 units: exp2 replaces exp

    if split == 0:  # exactly one program per (sequence, head) writes the new token's slot
        page = tl.load(block_table_row + position // PAGE_SIZE).to(tl.int64)
        slot_offset = (page * PAGE_SIZE + position % PAGE_SIZE) * token_stride + head * HEAD_DIM
        tl.store(k_cache_ptr + slot_offset + offs_d, k_new, mask=in_head)
        tl.store(v_cache_ptr + slot_offset + offs_d, v_new, mask=in_head)

    # Split 0 starts its running softmax from the new token (key `position`); other splits start empty.
    holds_new_token = split == 0
    new_score = tl.sum(q * k_new.to(tl.float32), axis=0)
    running_max = tl.where(holds_new_token, new_score, -float("inf"))
    running_sum = tl.where(holds_new_token, 1.0, 0.0)
    acc = tl.where(holds_new_token, v_new.to(tl.float32), 0.0)  # [BLOCK_D]

    # Cached keys 0..position-1, shared out between splits in BLOCK_N-aligned slices.
    tokens_per_split = tl.cdiv(tl.cdiv(position, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, position)
    offs_n = tl.arange(0, BLOCK_N)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + offs_n
        valid = tokens < end
        # A tile may span several pages: each token row finds its own page through the block table.
        pages = tl.load(block_table_row + tokens // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        rows = (pages * PAGE_SIZE + tokens % PAGE_SIZE) * token_stride + head * HEAD_DIM
        tile_mask = valid[:, None] & in_head[None, :]
        # Both loads issued before the score reduction (whose barriers loads cannot cross): more bytes in flight.
        k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_N]
        scores = tl.where(valid, scores, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max)
        acc = acc * correction + tl.sum(probs[:, None] * v.to(tl.float32), axis=0)
        running_sum = running_sum * correction + tl.sum(probs, axis=0)
        running_max = new_max

    out_offsets = seq * token_stride + head * HEAD_DIM + offs_d
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_offsets, cast_rounded(acc / running_sum, out_ptr.dtype.element_ty, INTERPRETED_BF16),
                 mask=in_head)
    else:
        # partials, one fp32 buffer: max [B, H, NUM_SPLITS], then sum [B, H, NUM_SPLITS], then acc
        # [B, H, NUM_SPLITS, BLOCK_D]; an empty split leaves (-inf, 0, 0).
        num_partials = tl.num_programs(0) * NUM_HEADS * NUM_SPLITS
        partial_max_ptr = partials_ptr
        partial_sum_ptr = partials_ptr + num_partials
        partial_acc_ptr = partials_ptr + 2 * num_partials
        first = (seq * NUM_HEADS + head) * NUM_SPLITS
        tl.store(partial_max_ptr + first + split, running_max)
        tl.store(partial_sum_ptr + first + split, running_sum)
        tl.store(partial_acc_ptr + (first + split) * BLOCK_D + offs_d, acc)
        tl.debug_barrier()  # every thread's partial is stored before the ticket (a release by one thread)
        ticket = tl.atomic_add(tickets_ptr + seq * NUM_HEADS + head, 1, sem="acq_rel")
        if ticket == NUM_SPLITS - 1:
            out = _merged_splits(partial_max_ptr, partial_sum_ptr, partial_acc_ptr, first, offs_d, BLOCK_D,
                                 NUM_SPLITS, BLOCK_S)
            tl.store(tickets_ptr + seq * NUM_HEADS + head, 0)  # all zeros again for the next launch
            tl.store(out_ptr + out_offsets, cast_rounded(out, out_ptr.dtype.element_ty, INTERPRETED_BF16),
                     mask=in_head)


@triton.jit
def _merged_splits(partial_max_ptr, partial_sum_ptr, partial_acc_ptr, first, offs_d,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The attention output [BLOCK_D] from one (sequence, head)'s NUM_SPLITS partials at index `first`, combined in
    split order; .cg loads read the other splits' partials from L2, never a stale L1 line."""
    offs_s = tl.arange(0, BLOCK_S)
    in_splits = offs_s < NUM_SPLITS
    split_max = tl.load(partial_max_ptr + first + offs_s, mask=in_splits, other=-float("inf"), cache_modifier=".cg")
    split_sum = tl.load(partial_sum_ptr + first + offs_s, mask=in_splits, other=0.0, cache_modifier=".cg")
    split_acc = tl.load(partial_acc_ptr + (first + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                        mask=in_splits[:, None], other=0.0, cache_modifier=".cg")  # [BLOCK_S, BLOCK_D]
    # Split 0 always holds the new token, so the overall max is finite and empty splits weigh exp2(-inf) = 0.
    overall_max = tl.max(split_max, axis=0)
    weights = tl.exp2(split_max - overall_max)
    total = tl.sum(weights * split_sum, axis=0)
    return tl.sum(weights[:, None] * split_acc, axis=0) / total


def decode_attention(
    qkv: Tensor, positions: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
    cos: Tensor, sin: Tensor, rotary_dims: int, num_splits: int | None = None, check_indices: bool = True,
    checked: bool = True,
) -> Tensor:
    """out [B, H*D]: rotary + cache append + attention over keys 0..positions[b] (see the module docstring).

    qkv [B, 3*H*D]; positions int32/int64 [B]; block_tables int32 [B, max_blocks_per_seq];
    k_cache, v_cache [num_blocks, block_size, H, D]; cos, sin float32 [max_positions, rotary_dims // 2].
    num_splits: None picks by heuristic, 1 forces the single-pass kernel, > 1 the split-K kernel (merged in-launch).
    check_indices: read positions and block_tables back (one device sync) to check every position and needed block
    id; skipped during CUDA-graph capture. False only for a caller whose indices are valid by construction: a bad
    one then reads or writes out of bounds. checked=False skips every argument check (types, shapes, indices):
    for a caller that checked them once for many calls (the model's layers share one set of inputs).
    """
    if checked:
        check_decode_arguments(qkv, positions, block_tables, k_cache, v_cache, cos, sin, rotary_dims, num_splits,
                               check_indices)
        check_triton_device("qkv", qkv)
    if num_splits is None:  # the interpreter runs programs one by one: splitting only adds work there
        _, page_size, num_heads, _ = k_cache.shape
        limits = device_limits(qkv.device)
        num_splits = 1 if limits.interpreted or qkv.shape[0] == 0 else pick_num_splits(
            qkv.shape[0], num_heads, block_tables.shape[1] * page_size, limits.num_sms)
    return launch_decode_attention(qkv, positions, block_tables, k_cache, v_cache, cos, sin, rotary_dims, num_splits)


def launch_decode_attention(
    qkv: Tensor, positions: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
    cos: Tensor, sin: Tensor, rotary_dims: int, num_splits: int,
) -> Tensor:
    """Launch the kernel on already-validated arguments with an explicit split count (1: single pass)."""
    batch = qkv.shape[0]
    _, page_size, num_heads, head_dim = k_cache.shape
    out = torch.empty(batch, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out
    scale_log2, block_d, meta = _launch_params(num_heads, head_dim, rotary_dims, page_size, num_splits,
                                               interpreted_bf16(qkv.dtype, qkv.device), uses_pdl(qkv.device))
    if num_splits > 1:  # max, sum and acc partials in one allocation (the kernel finds each part)
        partials = torch.empty(batch * num_heads * num_splits * (block_d + 2), dtype=torch.float32, device=qkv.device)
        tickets = ticket_counters(qkv.device, batch * num_heads)
    else:
        partials = tickets = out  # unused by the single-pass kernel
    _decode_attention_kernel[(batch, num_heads, num_splits)](
        qkv, positions, block_tables, k_cache, v_cache, cos, sin,
        out, partials, tickets,
        qkv.stride(0), block_tables.stride(0), cos.stride(0), scale_log2, **meta,
    )
    return out


@functools.cache
def _launch_params(num_heads: int, head_dim: int, rotary_dims: int, page_size: int, num_splits: int,
                   interpreted: bool, pdl: bool) -> tuple[float, int, dict]:
    """(softmax scale in log2 units, BLOCK_D, constexprs + launch options) of one shape, computed once."""
    block_d = next_power_of_2(head_dim)
    # 4096 loaded elements per K or V tile: ~64 registers/thread at 4 warps (sm_90, no spills), so 8 programs
    # fit on an SM and batch 32 x 32 heads runs in one wave on 132 SMs, with ~80 KB of loads in flight per SM.
    block_n = max(16, 4096 // block_d)
    meta = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, ROT_HALF=rotary_dims // 2,
                PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits),
                INTERPRETED_BF16=interpreted, num_warps=4, num_stages=2, **pdl_meta(pdl))
    return LOG2E / math.sqrt(head_dim), block_d, meta


@functools.cache
def pick_num_splits(batch: int, num_heads: int, max_context: int, num_sms: int) -> int:
    """Split the keys only when (sequence, head) programs are too few to fill the GPU and contexts are long.

    A power of two (1, 2, 4, 8 or 16), so decode compiles at most five variants whatever the batch. max_context is
    the block table's capacity (static, so the choice never reads device memory and stays fixed under CUDA-graph
    capture); each split takes an equal share of its sequence's real length.
    """
    programs = batch * num_heads
    wanted_programs = PROGRAMS_PER_SM * num_sms
    if programs >= wanted_programs:
        return 1
    splits = min(cdiv(wanted_programs, programs), max_context // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
    return 1 << (max(splits, 1).bit_length() - 1)  # rounded down to a power of two


def decode_attention_ref(
    qkv: Tensor, positions: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
    cos: Tensor, sin: Tensor, rotary_dims: int, num_splits: int | None = None, check_indices: bool = True,
    checked: bool = True,
) -> Tensor:
    """Plain-PyTorch decode_attention: same arguments, output and cache writes (num_splits changes nothing; the
    arguments are always checked).

    All rows at once: the cache slots of each row's keys 0..position are gathered into one padded
    [B, longest, H, D] block; a row's padding repeats its own new token's slot and is masked out of the softmax.
    """
    check_decode_arguments(qkv, positions, block_tables, k_cache, v_cache, cos, sin, rotary_dims, num_splits,
                           check_indices)
    if not bool((positions < 0).any()):
        return _decode_live_rows(qkv, positions.long(), block_tables.long(), k_cache, v_cache, cos, sin)
    out = torch.zeros_like(qkv[:, :qkv.shape[1] // 3])  # padding rows: [B, H * D] zeros, nothing written
    live = (positions >= 0).nonzero().flatten()
    if live.numel():
        out[live] = _decode_live_rows(qkv[live], positions[live].long(), block_tables[live].long(), k_cache,
                                      v_cache, cos, sin)
    return out


def _decode_live_rows(qkv: Tensor, positions: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
                      cos: Tensor, sin: Tensor) -> Tensor:
    """decode_attention_ref for rows with positions >= 0 (int64 positions and block tables): [B, H * D]."""
    batch = qkv.shape[0]
    _, page_size, num_heads, head_dim = k_cache.shape
    # q and k of every head rotated together: [B, H, 2, D], cos/sin rows broadcast over heads and q/k.
    q, k = apply_rotary_ref(qkv.view(batch, num_heads, 3, head_dim)[:, :, :2], cos[positions][:, None, None],
                            sin[positions][:, None, None]).unbind(2)
    k_slots = k_cache.view(-1, num_heads, head_dim)  # [num_blocks * block_size, H, D]
    v_slots = v_cache.view(-1, num_heads, head_dim)
    new_slot = block_tables.gather(1, (positions // page_size)[:, None]) * page_size + positions[:, None] % page_size
    k_slots[new_slot.flatten()] = k
    v_slots[new_slot.flatten()] = qkv.view(batch, num_heads, 3, head_dim)[:, :, 2]

    tokens = torch.arange(int(positions.max()) + 1, device=qkv.device)  # [T], T = longest context
    visible = tokens[None, :] <= positions[:, None]  # [B, T]
    # Slots past a row's end may hold anything (unwritten memory, another sequence): read the new token instead.
    slots = torch.where(visible, block_tables[:, tokens // page_size] * page_size + tokens % page_size, new_slot)
    keys = k_slots.index_select(0, slots.flatten()).view(*slots.shape, num_heads, head_dim).float()  # [B, T, H, D]
    values = v_slots.index_select(0, slots.flatten()).view(*slots.shape, num_heads, head_dim).float()
    attended = F.scaled_dot_product_attention(  # fp32 scores, softmax and sum, as the kernel: [B, H, 1, D]
        q.float()[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None, None, :])
    return attended.view(batch, num_heads * head_dim).to(qkv.dtype)

