"""Argument checks for `prefill_attention` and its reference: every bad value raises ValueError before launch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def check_triton_device(qkv: Tensor) -> None:
    """Triton compiles for CUDA; CPU tensors only run under Triton's interpreter (TRITON_INTERPRET=1)."""
    if qkv.device.type == "cuda" or (qkv.device.type == "cpu" and triton.knobs.runtime.interpret):
        return
    raise ValueError(f"qkv is on {qkv.device}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set "
                     f"before hayabusa.kernels is imported to run on CPU")


def _check_tensor(name: str, tensor: Tensor, ndim: int, dtypes: tuple[torch.dtype, ...],
                  device: torch.device) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of qkv)")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(tensor.stride())} "
                         f"for shape {tuple(tensor.shape)}")


def check_prefill_arguments(
    qkv: Tensor, positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
    k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, rotary_dims: int,
) -> int:
    """Validate shapes, dtypes, devices and every index; return the longest sequence's number of new tokens.

    The index tensors come to the host in a single copy (one device sync) and are checked there.
    """
    if not isinstance(qkv, Tensor):
        raise ValueError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    device = qkv.device
    _check_tensor("qkv", qkv, 2, SUPPORTED_DTYPES, device)
    _check_tensor("k_cache", k_cache, 4, (qkv.dtype,), device)
    _check_tensor("v_cache", v_cache, 4, (qkv.dtype,), device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, expected k_cache's {tuple(k_cache.shape)}")
    num_blocks, page_size, num_heads, head_dim = k_cache.shape
    if min(num_blocks, page_size, num_heads, head_dim) == 0:
        raise ValueError(f"k_cache [num_blocks, block_size, heads, head_dim] = {tuple(k_cache.shape)} has an empty dim")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} (from k_cache) exceeds the supported maximum {MAX_HEAD_DIM}")
    num_tokens = qkv.shape[0]
    if qkv.shape[1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, expected 3 * heads {num_heads} * head_dim {head_dim} "
                         f"= {3 * num_heads * head_dim} (heads and head_dim from k_cache)")
    _check_tensor("positions", positions, 1, (torch.int32, torch.int64), device)
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions has {positions.shape[0]} entries, expected one per qkv row ({num_tokens})")
    _check_tensor("cu_seqlens", cu_seqlens, 1, (torch.int32,), device)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("cu_seqlens must hold num_seqs + 1 >= 1 entries, got 0")
    _check_tensor("context_lens", context_lens, 1, (torch.int32,), device)
    if context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries, expected num_seqs = {num_seqs} "
                         f"(len(cu_seqlens) - 1)")
    _check_tensor("block_tables", block_tables, 2, (torch.int32,), device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected num_seqs = {num_seqs}")
    if isinstance(rotary_dims, bool) or not isinstance(rotary_dims, int) or rotary_dims % 2 \
            or not 0 <= rotary_dims <= head_dim:
        raise ValueError(f"rotary_dims must be an even integer in [0, head_dim {head_dim}], got {rotary_dims!r}")
    _check_tensor("cos", cos, 2, (torch.float32,), device)
    _check_tensor("sin", sin, 2, (torch.float32,), device)
    if cos.shape[1] != rotary_dims // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"[max_positions, rotary_dims // 2 = {rotary_dims // 2}]")
    return _check_indices_once(positions, cu_seqlens, context_lens, block_tables, num_blocks, page_size, cos.shape[0])


@dataclass
class _CheckedIndices:
    tensors: tuple[Tensor, ...]  # kept alive, so no other tensor can later sit at the same object identity
    versions: tuple[int, ...]  # autograd version counters: any in-place write bumps them
    limits: tuple[int, int, int]  # num_blocks, block_size, max_positions
    max_new_tokens: int


_last_checked: _CheckedIndices | None = None


def _check_indices_once(positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
                        num_blocks: int, page_size: int, max_positions: int) -> int:
    """`_check_indices`, skipped when the same unmodified index tensors were checked against the same limits.

    A forward pass hands one step's index tensors to every layer: they reach the host (a device sync) once per
    step, not once per layer.
    """
    global _last_checked
    tensors = (positions, cu_seqlens, context_lens, block_tables)
    if any(t.is_inference() for t in tensors):  # inference-mode tensors keep no version counter: check every call
        return _check_indices(positions, cu_seqlens, context_lens, block_tables, num_blocks, page_size,
                              max_positions)
    versions = tuple(t._version for t in tensors)
    limits = (num_blocks, page_size, max_positions)
    last = _last_checked
    if last is not None and last.limits == limits and last.versions == versions \
            and all(seen is tensor for seen, tensor in zip(last.tensors, tensors, strict=True)):
        return last.max_new_tokens
    max_new_tokens = _check_indices(positions, cu_seqlens, context_lens, block_tables,
                                    num_blocks, page_size, max_positions)
    _last_checked = _CheckedIndices(tensors, versions, limits, max_new_tokens)
    return max_new_tokens


def _check_indices(positions: Tensor, cu_seqlens: Tensor, context_lens: Tensor, block_tables: Tensor,
                   num_blocks: int, page_size: int, max_positions: int) -> int:
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
