"""Skinny-M GEMV on int8 / int4 weights (QuantizedWeight): `act(LN(x) @ dequant(W).T + bias) + residual` for
M <= GEMV_MAX_M rows, the dequantization fused into the weight stream (no fp16 copy of W, no extra launch).

The same design as gemv.py (BLOCK_N weight rows per program, the next K-step's codes prefetched while the current
one is multiplied, LayerNorm statistics in the prologue, split-K reduced in-launch), with tiles shaped
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

from ._gemm_common import finish_tile
from ._launch import DeviceLimits, cdiv, interpreted_bf16, next_power_of_2, ticket_counters
from .gemv import (
    GEMV_BLOCK_N,
    INTERPRETED_BLOCK_N,
    PROGRAMS_PER_SM,
    STATS_VALUES_PER_THREAD,
    GemvConfig,
    _normalized,
    _row_stats,
)
from .quantized_weight import QuantizedWeight

# K columns per step by (bits, BLOCK_M): at M = 1 a lane has 32 codes of a row in flight per step (4 x vectors'
# worth; 64 int4 codes spilled registers with the LayerNorm prologue), half that at M = 2 for int8, a quarter at 4
QUANTIZED_GEMV_BLOCK_K = {(8, 1): 1024, (8, 2): 512, (8, 4): 256, (4, 1): 1024, (4, 2): 1024, (4, 4): 512}
X_VECTOR_BYTES = 16  # a lane chunk is one 16-byte vector of x: 8 fp16 / bf16 columns, 4 fp32


def choose_quantized_gemv_config(M: int, N: int, K: int, bits: int, elem_bytes: int,
                                 limits: DeviceLimits) -> GemvConfig:
    """As choose_gemv_config, with K-steps sized for `bits`-bit codes and x of elem_bytes per element."""
    block_m = next_power_of_2(M)
    block_n = INTERPRETED_BLOCK_N if limits.interpreted else GEMV_BLOCK_N
    min_block_k = 32 * X_VECTOR_BYTES // elem_bytes  # one chunk per lane
    block_k = max(min_block_k, min(QUANTIZED_GEMV_BLOCK_K[bits, block_m], next_power_of_2(K)))
    n_tiles, k_tiles = cdiv(N, block_n), cdiv(K, block_k)
    split_k = 1
    while not limits.interpreted and n_tiles * split_k < PROGRAMS_PER_SM * limits.num_sms and k_tiles >= 4 * split_k:
        split_k *= 2
    split_k = cdiv(k_tiles, cdiv(k_tiles, split_k))
    return GemvConfig(block_m, block_n, block_k, split_k, num_warps=min(block_n, GEMV_BLOCK_N))


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
                           tiles_per_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBSTEPS: tl.constexpr,
                           CHUNK: tl.constexpr,
                           GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                           STATS_BLOCK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                           HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    # x: [M, K], codes: uint8 [N, code_cols], scales/zeros: [N, num_groups], out/residual: [M, N],
    # ln_weight/ln_bias: [K], partial: [SPLIT_K, M, N] fp32. GROUP_SIZE = 0: one scale per row.
    BLOCK_K: tl.constexpr = SUBSTEPS * 32 * CHUNK
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Tiles are [BLOCK_M, BLOCK_N, SUBSTEPS, 32, CHUNK]: a K-step is SUBSTEPS runs of 32 lane chunks of CHUNK columns
    # (one 16-byte x vector), each chunk inside one scale group (CHUNK <= 32 <= group size), so a chunk's products
    # are summed in its lane and scaled once.
    chunk_starts = (tl.arange(0, SUBSTEPS)[None, None, :, None] * 32 + tl.arange(0, 32)[None, None, None, :]) * CHUNK
    step_cols = chunk_starts[:, :, :, :, None] + tl.arange(0, CHUNK)[None, None, None, None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None, None, None] * K + step_cols
    x_mask = m_mask[:, None, None, None, None]
    row_groups = offs_n.to(tl.int64)[None, :, None, None] * num_groups  # [1, BLOCK_N, 1, 1]

    k_tiles = tl.cdiv(K, BLOCK_K)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    codes_next = load_codes(codes_ptr, offs_n, n_mask, tl.minimum(first, k_tiles - 1) * BLOCK_K, code_cols, SUBSTEPS,
                            CHUNK, BITS, EVEN_K)
    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, STATS_BLOCK)
        mean = mean[:, None, None, None, None]
        rstd = rstd[:, None, None, None, None]
    if GROUP_SIZE == 0:  # one scale and zero code per row, for the whole loop
        scale = tl.load(scales_ptr + row_groups, mask=n_mask[None, :, None, None], other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + row_groups, mask=n_mask[None, :, None, None], other=0).to(tl.float32)
            zero = zero[:, :, :, :, None]
        else:
            zero = 1 << (BITS - 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N, SUBSTEPS, 32), dtype=tl.float32)
    for k_tile in range(first, last):
        k0 = k_tile * BLOCK_K
        codes = codes_next
        codes_next = load_codes(codes_ptr, offs_n, n_mask, tl.minimum(k_tile + 1, last - 1) * BLOCK_K, code_cols,
                                SUBSTEPS, CHUNK, BITS, EVEN_K)
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptrs + k0, mask=x_mask & (k0 + step_cols < K), other=0.0).to(tl.float32)
        if HAS_LN:  # past K the parameters read as 0, so the normalized x is 0 there too
            k_mask = k0 + step_cols < K
            ln_w = tl.load(ln_weight_ptr + k0 + step_cols, mask=k_mask, other=0.0)
            ln_b = tl.load(ln_bias_ptr + k0 + step_cols, mask=k_mask, other=0.0)
            x = _normalized(x, mean, rstd, ln_w, ln_b, x_ptr.dtype.element_ty, INTERPRETED_BF16).to(tl.float32)
        if GROUP_SIZE != 0:
            group_index = (k0 + chunk_starts) // GROUP_SIZE  # [1, 1, SUBSTEPS, 32]
            g_mask = n_mask[None, :, None, None] & (group_index < num_groups)
            scale = tl.load(scales_ptr + row_groups + group_index, mask=g_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + row_groups + group_index, mask=g_mask, other=0).to(tl.float32)
                zero = zero[:, :, :, :, None]
            else:
                zero = 1 << (BITS - 1)
        acc += tl.sum(x * code_values(codes, zero), axis=4) * scale  # [BLOCK_M, BLOCK_N, SUBSTEPS, 32]

    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    finish_tile(y, offs_m, offs_n, M, N, pid_n, split, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                SPLIT_K, HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)


@functools.cache
def _launch_params(config: GemvConfig, N: int, K: int, elem_bytes: int, bits: int, group_size: int | None,
                   has_zeros: bool, flags: tuple[bool, bool, bool, bool, bool]) -> tuple:
    """(grid, tiles per split, constexprs + launch options) of one shape, format and epilogue, computed once."""
    has_ln, has_bias, gelu, has_residual, interpreted = flags
    n_tiles, k_tiles = cdiv(N, config.block_n), cdiv(K, config.block_k)
    chunk = X_VECTOR_BYTES // elem_bytes
    stats_block = min(next_power_of_2(K), STATS_VALUES_PER_THREAD * 32 * config.num_warps // config.block_m) \
        if has_ln else 16
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, SUBSTEPS=config.block_k // (32 * chunk), CHUNK=chunk,
                GROUP_SIZE=group_size or 0, BITS=bits, HAS_ZEROS=has_zeros, STATS_BLOCK=stats_block,
                SPLIT_K=config.split_k, EVEN_K=K % config.block_k == 0, HAS_LN=has_ln, HAS_BIAS=has_bias, GELU=gelu,
                HAS_RESIDUAL=has_residual, INTERPRETED_BF16=interpreted, num_warps=config.num_warps, num_stages=1)
    return (n_tiles, config.split_k), cdiv(k_tiles, config.split_k), meta


def launch_quantized_gemv(config: GemvConfig, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                          residual: torch.Tensor | None, activation: str | None, out: torch.Tensor,
                          ln: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Run the quantized GEMV with an explicit config on validated arguments; ln = (ln_weight, ln_bias, eps)."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    flags = (ln is not None, bias is not None, activation == "gelu", residual is not None,
             interpreted_bf16(x.dtype, x.device))
    grid, tiles_per_split, meta = _launch_params(config, N, K, x.element_size(), weight.bits, weight.group_size,
                                                 weight.zeros is not None, flags)
    partial = tickets = out  # placeholders for pointers the kernel never reads when split_k == 1
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
        tickets = ticket_counters(x.device, grid[0])
    ln_weight, ln_bias, eps = ln if ln is not None else (out, out, 0.0)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    _gemv_quantized_kernel[grid](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else out,
        residual if residual is not None else out, out, partial, tickets, ln_weight, ln_bias, eps, M, N, K,
        weight.qweight.shape[1], weight.num_groups, tiles_per_split, **meta)
    return out
