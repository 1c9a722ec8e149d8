"""Argument checks of the paged attention kernels and their references: a bad value raises ValueError before launch.

Types, shapes, dtypes and devices are host metadata, checked on every call. Index values (sequence bounds,
positions, block ids) live on the device: checking them copies them to the host, one sync per call. A caller that
built them on the host, valid by construction (the engine's ModelRunner), passes check_indices=False and, for
prefill, max_seqlen_q, and the launch then reads nothing back from the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hayabusa.kernels._launch import check_tensor

MAX_HEAD_DIM = 256
MAX_SPLITS = 16  # decode's split-K: partial results per (sequence, head)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_shared_arguments(qkv: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor,
                           sin: Tensor, rotary_dims: int) -> tuple[int, int, int, int]:
    """The operands prefill and decode share; returns k_cache's (num_blocks, block_size, num_heads, head_dim)."""
    check_tensor("qkv", qkv, ndim=2)
    device = qkv.device
    check_tensor("k_cache", k_cache, ndim=4, dtype=qkv.dtype, device=device)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=qkv.dtype, device=device)
    num_blocks, page_size, num_heads, head_dim = k_cache.shape
    if min(num_blocks, page_size, num_heads, head_dim) == 0:
        raise ValueError(f"k_cache [num_blocks, block_size, heads, head_dim] = {tuple(k_cache.shape)} has an empty dim")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} (from k_cache) exceeds the supported maximum {MAX_HEAD_DIM}")
    if qkv.shape[1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, expected 3 * heads {num_heads} * head_dim {head_dim} "
                         f"= {3 * num_heads * head_dim} (heads and head_dim from k_cache)")
    if isinstance(rotary_dims, bool) or not isinstance(rotary_dims, int) or rotary_dims % 2 \
            or not 0 <= rotary_dims <= head_dim:
        raise ValueError(f"rotary_dims must be an even integer in [0, head_dim {head_dim}], got {rotary_dims!r}")
    check_tensor("cos", cos, ndim=2, dtype=torch.float32, device=device)
    check_tensor("sin", sin, ndim=2, dtype=torch.float32, device=device)
    if cos.shape[1] != rotary_dims // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"[max_positions, rotary_dims // 2 = {rotary_dims // 2}]")
    check_tensor("positions", positions, ndim=1, dtype=INDEX_DTYPES, device=device)
    if positions.shape[0] != qkv.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries, expected one per qkv row ({qkv.shape[0]})")
    return num_blocks, page_size, num_heads, head_dim


def check_prefill_arguments(
    qkv: Tensor, positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
    k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, rotary_dims: int,
    max_seqlen_q: int | None, check_indices: bool,
) -> int:
    """Validate `prefill_attention`'s arguments; return the new-token count its grid must cover.

    That is max_seqlen_q when given, else the longest sequence's new tokens, read from cu_seqlens. With
    check_indices the index tensors come to the host in one copy (one device sync) and every value is checked.
    """
    num_blocks, page_size, _, _ = check_shared_arguments(qkv, positions, k_cache, v_cache, cos, sin, rotary_dims)
    device = qkv.device
    num_tokens = qkv.shape[0]
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtype=torch.int32, device=device)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("cu_seqlens must hold num_seqs + 1 >= 1 entries, got 0")
    check_tensor("context_lens", context_lens, ndim=1, dtype=torch.int32, device=device)
    if context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries, expected num_seqs = {num_seqs} "
                         f"(len(cu_seqlens) - 1)")
    check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32, device=device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected num_seqs = {num_seqs}")
    if max_seqlen_q is not None and (isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int)
                                     or not 0 <= max_seqlen_q <= num_tokens):
        raise ValueError(f"max_seqlen_q must be None or an integer in [0, qkv rows {num_tokens}], "
                         f"got {max_seqlen_q!r}")
    if check_indices:
        longest = _check_prefill_indices(positions, cu_seqlens, context_lens, block_tables,
                                         num_blocks, page_size, cos.shape[0])
        if max_seqlen_q is not None and max_seqlen_q < longest:
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} is less than the longest sequence's {longest} new "
                             f"tokens (from cu_seqlens)")
        return longest if max_seqlen_q is None else max_seqlen_q
    if max_seqlen_q is None:
        return int(cu_seqlens.diff().max()) if num_seqs else 0  # the one read from the device left
    return max_seqlen_q


def check_decode_arguments(
    qkv: Tensor, positions: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
    cos: Tensor, sin: Tensor, rotary_dims: int, num_splits: int | None, check_indices: bool,
) -> None:
    """Validate `decode_attention`'s arguments; with check_indices also every position and needed block id.

    The index values are never read during a CUDA-graph capture, which forbids device-to-host copies.
    """
    num_blocks, page_size, _, _ = check_shared_arguments(qkv, positions, k_cache, v_cache, cos, sin, rotary_dims)
    batch = qkv.shape[0]
    check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32, device=qkv.device)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected one per qkv row ({batch})")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an integer in [1, {MAX_SPLITS}], got {num_splits!r}")
    if not check_indices or batch == 0 or (qkv.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    _check_decode_indices(positions, block_tables, num_blocks, page_size, cos.shape[0])


def _check_decode_indices(positions: Tensor, block_tables: Tensor, num_blocks: int, page_size: int,
                          max_positions: int) -> None:
    """Every position fits the rotary table and the block table; every page a sequence needs is a real block."""
    max_blocks_per_seq = block_tables.shape[1]
    pages_needed = positions.long() // page_size + 1  # [B]; 0 for padding rows (position -1 // p + 1 = 0)
    needed = torch.arange(max_blocks_per_seq, device=positions.device)[None, :] < pages_needed[:, None]
    bad_entry = needed & ((block_tables < 0) | (block_tables >= num_blocks))
    # One device-to-host transfer for all three checks.
    max_position, any_bad_entry = torch.stack((positions.max().long(), bad_entry.any().long())).tolist()
    capacity = max_blocks_per_seq * page_size
    if max_position >= max_positions:
        raise ValueError(f"positions holds {max_position}, beyond the rotary tables cos/sin "
                         f"({max_positions} positions)")
    if max_position >= capacity:
        raise ValueError(f"positions holds {max_position}, beyond block_tables capacity "
                         f"{max_blocks_per_seq} blocks x block_size {page_size} = {capacity} tokens")
    if any_bad_entry:
        seq, column = bad_entry.nonzero()[0].tolist()
        raise ValueError(f"block_tables[{seq}, {column}] = {int(block_tables[seq, column])} is needed by "
                         f"positions[{seq}] = {int(positions[seq])} but is outside [0, num_blocks = {num_blocks})")


def _check_prefill_indices(positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
                           num_blocks: int, page_size: int, max_positions: int) -> int:
    """Check every index value on the host; return the longest sequence's number of new tokens."""
    num_seqs, max_blocks = block_tables.shape
    num_tokens = positions.shape[0]
    host = torch.cat([cu_seqlens.long(), context_lens.long(), positions.long(), block_tables.reshape(-1).long()])
    cu, context, pos, table = host.cpu().split([num_seqs + 1, num_seqs, num_tokens, num_seqs * max_blocks])
    table = table.view(num_seqs, max_blocks)

    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of qkv rows {num_tokens}, "
                         f"got {cu[0].item()} ... {cu[-1].item()}")
    num_new = cu.diff()
    if (num_new < 0).any():
        seq = _first(num_new < 0)
        raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{seq + 1}] = {cu[seq + 1].item()} < "
                         f"cu_seqlens[{seq}] = {cu[seq].item()}")
    if (context < num_new).any():
        seq = _first(context < num_new)
        raise ValueError(f"context_lens[{seq}] = {context[seq].item()} is less than the sequence's "
                         f"{num_new[seq].item()} new tokens")
    if (context > max_positions).any():
        seq = _first(context > max_positions)
        raise ValueError(f"context_lens[{seq}] = {context[seq].item()}: positions up to {context[seq].item() - 1} "
                         f"exceed the rotary table length {max_positions} (cos.shape[0])")
    blocks_needed = (context + page_size - 1) // page_size
    if (blocks_needed > max_blocks).any():
        seq = _first(blocks_needed > max_blocks)
        raise ValueError(f"context_lens[{seq}] = {context[seq].item()} needs {blocks_needed[seq].item()} blocks of "
                         f"{page_size}, but block_tables has only {max_blocks} columns")
    in_use = torch.arange(max_blocks)[None, :] < blocks_needed[:, None]
    bad_block = in_use & ((table < 0) | (table >= num_blocks))
    if bad_block.any():
        seq, col = bad_block.nonzero()[0].tolist()
        raise ValueError(f"block_tables[{seq}, {col}] = {table[seq, col].item()} is outside the cache's "
                         f"block ids [0, {num_blocks})")
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), num_new, output_size=num_tokens)
    expected = (context - num_new)[seq_of_token] + torch.arange(num_tokens) - cu[:-1][seq_of_token]
    if (pos != expected).any():
        token = _first(pos != expected)
        raise ValueError(f"positions[{token}] = {pos[token].item()}, expected {expected[token].item()}: sequence "
                         f"{seq_of_token[token].item()}'s new tokens sit at context_lens - n ... context_lens - 1")
    return int(num_new.max()) if num_seqs else 0


def _first(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0])
