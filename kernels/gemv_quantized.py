"""Skinny-M GEMV on int8 / int4 weights (QuantizedWeight): `act(LN(x) @ dequant(W).T + bias) + residual` for
M <= GEMV_MAX_M rows, the dequantization fused into the weight stream (no fp16 copy of W, no extra launch).

The same design as gemv.py (a persistent launch of 2 programs per SM at <= 64 registers, each an equal run of
(16-row tile, K-step) units with the next step's codes in flight, LayerNorm statistics once per program, tiles shared
by programs reduced in-launch in program order, programmatic dependent launch), with tiles shaped
[BLOCK_M, BLOCK_N, SUBSTEPS, 32, CHUNK]: a K-step is SUBSTEPS runs of 32 lane chunks of CHUNK consecutive columns.

- A chunk is one 16-byte vector of x (CHUNK = 8 fp16 / bf16 columns, 4 fp32), so the codes a lane loads (8 bytes
  int8, 4 bytes int4: a whole 128- or 256-byte line per warp instruction) line up with x's lanes in registers;
  each int4 byte's two nibbles are joined back into column order there.
- A chunk lies inside one scale group (CHUNK <= 8 < 32 <= group size), so its products x * (u - zero) are summed in
  the lane and scaled once: one multiply per chunk, not per weight, and no lane shuffles inside the loop.
- u - zero becomes an exact fp32 integer by exponent arithmetic (`code_values`), not by an int-to-float
  conversion, which issues at a quarter of the FP32 rate and would cap an int4 stream below HBM speed.
"""

import functools

import torch
import triton
import triton.language as tl

from ._gemm_common import finish_shared_tile
from ._launch import (
    DeviceLimits,
    cdiv,
    next_power_of_2,
    pdl_meta,
    wait_for_prior_grid,
)
from .gemv import (
    GEMV_BLOCK_N,
    GEMV_NUM_WARPS,
    INTERPRETED_BLOCK_N,
    PROGRAMS_PER_SM,
    UNITS_PER_PROGRAM,
    GemvConfig,
    _normalized,
    _row_stats,
    launch_flags,
    shared_tile_buffers,
    variant_meta,
    work_shares,
)
from .quantized_weight import QuantizedWeight

# K columns per step by (bits, BLOCK_M): what ptxas fits in the 64 registers of a program (2 per SM) without spilling,
# LayerNorm prologue and zero codes included (1024 at M = 1 and 512 at M = 2 spilled 12-76 bytes)
QUANTIZED_GEMV_BLOCK_K = {(8, 1): 512, (8, 2): 256, (8, 4): 256, (4, 1): 512, (4, 2): 256, (4, 4): 256}
X_VECTOR_BYTES = 16  # a lane chunk is one 16-byte vector of x: 8 fp16 / bf16 columns, 4 fp32


def choose_quantized_gemv_config(M: int, N: int, K: int, bits: int, elem_bytes: int,
                                 limits: DeviceLimits) -> GemvConfig:
    """As choose_gemv_config, with K-steps sized for `bits`-bit codes and x of elem_bytes per element."""
    block_m = next_power_of_2(M)
    min_block_k = 32 * X_VECTOR_BYTES // elem_bytes  # one chunk per lane
    block_k = max(min_block_k, min(QUANTIZED_GEMV_BLOCK_K[bits, block_m], next_power_of_2(K)))
    if limits.interpreted:
        return GemvConfig(block_m, INTERPRETED_BLOCK_N, block_k, cdiv(N, INTERPRETED_BLOCK_N), GEMV_NUM_WARPS)
    n_tiles, most_programs = cdiv(N, GEMV_BLOCK_N), PROGRAMS_PER_SM * limits.num_sms
    while block_k > min_block_k and n_tiles * cdiv(K, block_k) < UNITS_PER_PROGRAM * most_programs:
        block_k //= 2
    return GemvConfig(block_m, GEMV_BLOCK_N, block_k, min(n_tiles * cdiv(K, block_k), most_programs), GEMV_NUM_WARPS)


@triton.jit
def load_codes(codes_ptr, rows, n_mask, k0, code_cols, SUBSTEPS: tl.constexpr, CHUNK: tl.constexpr,
               BITS: tl.constexpr, EVEN_K: tl.constexpr):
    """The codes of the K-step from column k0 of weight rows `rows` ([BLOCK_N]), as int32
    [1, BLOCK_N, SUBSTEPS, 32, CHUNK] in column order (int4: a byte's low nibble is the even column)."""
    CODE_CHUNK: tl.constexpr = CHUNK if BITS == 8 else CHUNK // 2  # bytes per lane chunk
    byte_cols = (k0 // CHUNK * CODE_CHUNK + tl.arange(0, SUBSTEPS)[None, None, :, None, None] * (32 * CODE_CHUNK)
                 + tl.arange(0, 32)[None, None, None, :, None] * CODE_CHUNK
                 + tl.arange(0, CODE_CHUNK)[None, None, None, None, :])
    mask = n_mask[None, :, None, None, None]
    if not EVEN_K:
        mask = mask & (byte_cols < code_cols)
    packed = tl.load(codes_ptr + rows.to(tl.int64)[None, :, None, None, None] * code_cols + byte_cols, mask=mask,
                     other=0).to(tl.int32)
    if BITS == 4:
        packed = tl.reshape(tl.join(packed & 0xF, packed >> 4), (1, packed.shape[1], SUBSTEPS, 32, CHUNK))
    return packed


@triton.jit
def code_values(codes, zero):
    """codes - zero as exact fp32 integers, without an int-to-float conversion (a quarter-rate instruction): a code
    c < 2**23 ORed into the exponent of 2**23 is the float 2**23 + c, and subtracting 2**23 + zero is exact."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zero)


@triton.jit(do_not_specialize=["M"])
def _gemv_quantized_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr,
                           tickets_ptr, ln_weight_ptr, ln_bias_ptr, eps, M, N, K, code_cols, num_groups,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBSTEPS: tl.constexpr,
                           CHUNK: tl.constexpr,
                           GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                           STATS_BLOCK: tl.constexpr, EVEN_K: tl.constexpr,
                           HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, INTERPRETED_BF16: tl.constexpr, PDL: tl.constexpr):
    # x: [M, K], codes: uint8 [N, code_cols], scales/zeros: [N, num_groups], out/residual: [M, N],
    # ln_weight/ln_bias: [K], partial: [programs, 2, BLOCK_M, BLOCK_N] fp32. GROUP_SIZE = 0: one scale per row.
    BLOCK_K: tl.constexpr = SUBSTEPS * 32 * CHUNK
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_units = tl.cdiv(N, BLOCK_N) * k_tiles
    # This program's equal share of the (weight-row tile, K-step) units, in row-major order (see gemv.py).
    first = (pid.to(tl.int64) * num_units // programs).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * num_units // programs).to(tl.int32)
    tile = first // k_tiles
    k_tile = first - tile * k_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    # Tiles are [BLOCK_M, BLOCK_N, SUBSTEPS, 32, CHUNK]: a K-step is SUBSTEPS runs of 32 lane chunks of CHUNK columns
    # (one 16-byte x vector), each chunk inside one scale group (CHUNK <= 32 <= group size), so a chunk's products
    # are summed in its lane and scaled once.
    chunk_starts = (tl.arange(0, SUBSTEPS)[None, None, :, None] * 32 + tl.arange(0, 32)[None, None, None, :]) * CHUNK
    step_cols = chunk_starts[:, :, :, :, None] + tl.arange(0, CHUNK)[None, None, None, None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None, None, None] * K + step_cols
    x_mask = m_mask[:, None, None, None, None]

    # The first codes are in flight while this program waits for the previous kernel and computes the statistics.
    rows = tile * BLOCK_N + offs_n
    codes_next = load_codes(codes_ptr, rows, rows < N, k_tile * BLOCK_K, code_cols, SUBSTEPS, CHUNK, BITS, EVEN_K)
    wait_for_prior_grid(PDL)
    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, STATS_BLOCK)
        mean = mean[:, None, None, None, None]
        rstd = rstd[:, None, None, None, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N, SUBSTEPS, 32), dtype=tl.float32)
    for unit in range(first, end):
        codes = codes_next
        next_k_tile = k_tile + 1
        tile_ends = next_k_tile == k_tiles
        next_tile = tile + tile_ends
        next_k_tile = tl.where(tile_ends, 0, next_k_tile)
        share_ends = unit + 1 == end  # then the prefetch re-reads this unit: an L1 hit, and no branch
        next_rows = tl.where(share_ends, tile, next_tile) * BLOCK_N + offs_n
        next_k0 = tl.where(share_ends, k_tile, next_k_tile) * BLOCK_K
        codes_next = load_codes(codes_ptr, next_rows, next_rows < N, next_k0, code_cols, SUBSTEPS, CHUNK, BITS, EVEN_K)
        k0 = k_tile * BLOCK_K
        rows = tile * BLOCK_N + offs_n
        n_mask = rows < N
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptrs + k0, mask=x_mask & (k0 + step_cols < K), other=0.0).to(tl.float32)
        if HAS_LN:  # past K the parameters read as 0, so the normalized x is 0 there too
            k_mask = k0 + step_cols < K
            ln_w = tl.load(ln_weight_ptr + k0 + step_cols, mask=k_mask, other=0.0)
            ln_b = tl.load(ln_bias_ptr + k0 + step_cols, mask=k_mask, other=0.0)
            x = _normalized(x, mean, rstd, ln_w, ln_b, x_ptr.dtype.element_ty, INTERPRETED_BF16).to(tl.float32)
        row_groups = rows.to(tl.int64)[None, :, None, None] * num_groups  # [1, BLOCK_N, 1, 1]
        group_index = (k0 + chunk_starts) // GROUP_SIZE if GROUP_SIZE != 0 else chunk_starts * 0  # [1, 1, SUBSTEPS, 32]
        g_mask = n_mask[None, :, None, None] & (group_index < num_groups)
        scale = tl.load(scales_ptr + row_groups + group_index, mask=g_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + row_groups + group_index, mask=g_mask, other=0).to(tl.float32)
            zero = zero[:, :, :, :, None]
        else:
            zero = 1 << (BITS - 1)
        acc += tl.sum(x * code_values(codes, zero), axis=4) * scale  # [BLOCK_M, BLOCK_N, SUBSTEPS, 32]
        if tile_ends | share_ends:  # this program's share of the tile ends here
            finish_shared_tile(tl.sum(tl.sum(acc, axis=3), axis=2), offs_m, rows, M, N, tile, k_tiles, num_units,
                               first, pid, programs, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                               HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)
            acc = tl.zeros((BLOCK_M, BLOCK_N, SUBSTEPS, 32), dtype=tl.float32)
        tile = next_tile
        k_tile = next_k_tile


@functools.cache
def _launch_params(config: GemvConfig, N: int, K: int, elem_bytes: int, bits: int, group_size: int | None,
                   has_zeros: bool, flags: tuple[bool, bool, bool, bool, bool, bool]) -> tuple:
    """(whether programs share tiles, constexprs + launch options) of one shape, format and epilogue, computed once."""
    has_ln, has_bias, gelu, has_residual, interpreted, pdl = flags
    units, starts_inside_tiles = work_shares(config, N, K)
    if not 1 <= config.programs <= units:
        raise ValueError(f"quantized GEMV config {config} on weights [{N}, {K}]: needs 1 to {units} programs")
    chunk = X_VECTOR_BYTES // elem_bytes
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, SUBSTEPS=config.block_k // (32 * chunk), CHUNK=chunk,
                GROUP_SIZE=group_size or 0, BITS=bits, HAS_ZEROS=has_zeros, EVEN_K=K % config.block_k == 0,
                HAS_LN=has_ln, HAS_BIAS=has_bias, GELU=gelu, HAS_RESIDUAL=has_residual, INTERPRETED_BF16=interpreted,
                num_warps=config.num_warps, **pdl_meta(pdl), **variant_meta(config, K, has_ln, interpreted))
    return starts_inside_tiles > 0, meta


def launch_quantized_gemv(config: GemvConfig, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                          residual: torch.Tensor | None, activation: str | None, out: torch.Tensor,
                          ln: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Run the quantized GEMV with an explicit config on validated arguments; ln = (ln_weight, ln_bias, eps)."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    shares_tiles, meta = _launch_params(config, N, K, x.element_size(), weight.bits, weight.group_size,
                                        weight.zeros is not None, launch_flags(x, bias, residual, activation, ln))
    partial, tickets = shared_tile_buffers(config, N, shares_tiles, out)
    ln_weight, ln_bias, eps = ln if ln is not None else (out, out, 0.0)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    _gemv_quantized_kernel[(config.programs,)](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else out,
        residual if residual is not None else out, out, partial, tickets, ln_weight, ln_bias, eps, M, N, K,
        weight.qweight.shape[1], weight.num_groups, **meta)
    return out
