"""Tile GEMM on int8 / int4 weights (QuantizedWeight) for M > GEMV_MAX_M rows (decode batches, prefill); linear.py
chooses its config and dispatches it.

Each K-tile of codes is loaded as bytes, dequantized in registers to x's dtype and fed to tl.dot: the weights cross
HBM once as codes and never exist in fp16 anywhere else. K-tiles never straddle a scale group (BLOCK_K <= group
size, both powers of two), so a tile needs one scale (and zero code) per weight row:

- grouped scales: w = (u - zero) * scale rounded to x's dtype, as compressed-tensors' dequantize rounds it;
- per-channel scales: the tile multiplies the exact integers u - zero (|u - zero| < 256: exact in fp16 and bf16)
  and the row's scale multiplies the fp32 accumulator once, in the epilogue's prologue.

The tile table is linear.py's (configs per M bucket) with BLOCK_K capped at the group size.
"""

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._gemm_common import finish_tile, grouped_tile, split_k_tiles
from ._launch import cdiv, dot, interpreted_bf16, pdl_meta, ticket_counters, uses_pdl, wait_for_prior_grid
from .quantized_weight import QuantizedWeight

if TYPE_CHECKING:  # linear.py imports this module to dispatch to it
    from .linear import GemmConfig


@triton.jit(do_not_specialize=["M"])
def _linear_quantized_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr,
                             tickets_ptr, M, N, K, CODE_COLS, NUM_GROUPS,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                             SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                             HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr, PDL: tl.constexpr):
    # x: [M, K], codes: uint8 [N, CODE_COLS], scales/zeros: [N, NUM_GROUPS], out/residual: [M, N],
    # partial: [SPLIT_K, M, N] fp32 (used when SPLIT_K > 1). GROUP_SIZE = 0: one scale per row.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    wait_for_prior_grid(PDL)  # x and the residual may be the previous kernel's output
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    CODE_K: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2  # code bytes per row per K-tile
    offs_code = tl.arange(0, CODE_K)
    # Rows/columns past the edge wrap onto valid ones, so loads need no M/N mask; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    k_tile_start, k_tile_end = split_k_tiles(K, split, BLOCK_K, SPLIT_K)
    x_ptrs = x_ptr + rows[:, None] * K + (k_tile_start * BLOCK_K + offs_k)[None, :]
    code_ptrs = codes_ptr + cols[:, None] * CODE_COLS + (k_tile_start * CODE_K + offs_code)[None, :]
    if GROUP_SIZE == 0:
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + cols).to(tl.float32)[:, None]
        else:
            zero = 1 << (BITS - 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(k_tile_start, k_tile_end):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            packed = tl.load(code_ptrs)
        else:
            x_tile = tl.load(x_ptrs, mask=offs_k[None, :] < K - k_tile * BLOCK_K, other=0.0)
            packed = tl.load(code_ptrs, mask=offs_code[None, :] < CODE_COLS - k_tile * CODE_K, other=0)
        packed = packed.to(tl.int32)  # [BLOCK_N, CODE_K]
        if BITS == 8:
            codes = packed
        else:  # the low nibble is the even column
            codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        if GROUP_SIZE == 0:
            w_tile = (codes.to(tl.float32) - zero).to(x_ptr.dtype.element_ty)
        else:
            group_index = cols * NUM_GROUPS + (k_tile * BLOCK_K) // GROUP_SIZE
            scale = tl.load(scales_ptr + group_index).to(tl.float32)[:, None]
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + group_index).to(tl.float32)[:, None]
            else:
                zero = 1 << (BITS - 1)
            w_tile = ((codes.to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
        # x_tile: [BLOCK_M, BLOCK_K], w_tile: [BLOCK_N, BLOCK_K]
        acc = dot(x_tile, tl.trans(w_tile), acc, INPUT_PRECISION, INTERPRETED_BF16)
        x_ptrs += BLOCK_K
        code_ptrs += CODE_K

    if GROUP_SIZE == 0:
        acc = acc * tl.load(scales_ptr + cols).to(tl.float32)[None, :]
    finish_tile(acc, offs_m, offs_n, M, N, pid, split, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                SPLIT_K, HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)


def quantized_gemm_config(config: "GemmConfig", group_size: int | None) -> "GemmConfig":
    """A dense tile config with BLOCK_K capped at the group size, so that a K-tile lies in one scale group."""
    if group_size is None or config.block_k <= group_size:
        return config
    return dataclasses.replace(config, block_k=group_size)


@functools.cache
def _launch_params(config: "GemmConfig", N: int, K: int, bits: int, group_size: int | None, has_zeros: bool,
                   flags: tuple[bool, bool, bool, bool, bool, bool]) -> tuple:
    """(output-tile columns, constexprs + launch options) of one shape, format and epilogue, computed once."""
    has_bias, gelu, has_residual, fp32, interpreted, pdl = flags
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_SIZE=group_size or 0,
                BITS=bits, HAS_ZEROS=has_zeros, SPLIT_K=config.split_k, GROUP_M=config.group_m,
                EVEN_K=K % config.block_k == 0, HAS_BIAS=has_bias, GELU=gelu, HAS_RESIDUAL=has_residual,
                INPUT_PRECISION="ieee" if fp32 else "tf32", INTERPRETED_BF16=interpreted,
                num_warps=config.num_warps, num_stages=config.num_stages, **pdl_meta(pdl))
    return cdiv(N, config.block_n), meta


def launch_quantized_linear(config: "GemmConfig", x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                            residual: torch.Tensor | None, activation: str | None, out: torch.Tensor) -> torch.Tensor:
    """Run the quantized tile GEMM with an explicit config (BLOCK_K <= group size) on validated arguments."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    flags = (bias is not None, activation == "gelu", residual is not None, x.dtype == torch.float32,
             interpreted_bf16(x.dtype, x.device), uses_pdl(x.device))
    n_tiles, meta = _launch_params(config, N, K, weight.bits, weight.group_size, weight.zeros is not None, flags)
    out_tiles = cdiv(M, config.block_m) * n_tiles
    partial = tickets = out  # placeholders for pointers the kernel never reads when split_k == 1
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
        tickets = ticket_counters(x.device, out_tiles)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    _linear_quantized_kernel[(out_tiles, config.split_k)](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else out,
        residual if residual is not None else out, out, partial, tickets, M, N, K, weight.qweight.shape[1],
        weight.num_groups, **meta)
    return out
