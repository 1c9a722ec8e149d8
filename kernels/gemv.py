"""Skinny-M linear (GEMV): `act(LN(x) @ weight.T + bias) + residual` for M <= GEMV_MAX_M rows, on CUDA cores.

At decode batch sizes a linear layer is a weight stream: every weight byte is read once and used M times. The
kernel is built for that: each program owns BLOCK_N weight rows (one per warp) and walks K in 512-column steps
with two 16-byte loads per lane per row, prefetching the next step's weights while it multiplies the current
ones; the products accumulate elementwise in fp32 and are reduced across K once, after the loop (no shuffles
inside it). No tensor cores and no shared-memory staging of weights: they go straight from HBM to registers.

Crossover (GEMV_MAX_M = 4), H200 fp16 figures: streaming weights at the measured ~4.3 TB/s delivers 2.15e12
weight elements/s, each needing M fp32 FMAs plus one conversion. The FP32 pipes issue ~33e12 FMA/s (67 TFLOP/s),
so M = 4 keeps them ~26% busy (room for the conversions, x loads and address math), M = 8 ~52% and M = 16 ~103%:
compute-bound. Registers agree: the accumulator holds M x 16 fp32 per thread, and with the LayerNorm prologue
M = 4 already needs more than the 128 registers a 16-warp program may use (ptxas spilled 184 bytes), so M = 4
takes half-width K-steps (8 per lane). From M = 5 the tensor-core tile kernel (linear.py, 16-row tiles) reads the same
bytes with its arithmetic free, so it takes over there.

LayerNorm prologue (HAS_LN): every program recomputes its rows' statistics over K in one pass from L2 (one chunk
of at most 32 values per thread at the 2.7B width, while the first weight step is already in flight) and
normalizes each x tile as it streams: BLOCK_M / BLOCK_N extra bytes per weight byte (1/16 at M = 1), far cheaper
than a separate LayerNorm launch and the gap before it.

Split-K: when the weight rows alone give fewer than 2 programs per SM (N = 2560 at the 2.7B widths), K is split
and the partial sums are reduced inside the launch in a fixed order (see `finish_tile`): deterministic.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._gemm_common import finish_tile
from ._launch import DeviceLimits, cast_rounded, cdiv, interpreted_bf16, next_power_of_2, ticket_counters

GEMV_MAX_M = 4
GEMV_BLOCK_N = 16  # weight rows per program, one per warp
INTERPRETED_BLOCK_N = 64  # the CPU interpreter pays per program: fewer, larger ones
GEMV_BLOCK_K = {1: 512, 2: 512, 4: 256}  # K columns per step by BLOCK_M: 16 (8 at M = 4) per lane
STATS_VALUES_PER_THREAD = 32  # LayerNorm statistics read [BLOCK_M, STATS_BLOCK] chunks of this many per thread
PROGRAMS_PER_SM = 2  # split K until the programs reach this many per SM


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # 1, 2 or 4: x rows, all in every program
    block_n: int
    block_k: int
    split_k: int  # programs sharing one weight-row block along K; their partials are reduced in-launch
    num_warps: int


def choose_gemv_config(M: int, N: int, K: int, limits: DeviceLimits) -> GemvConfig:
    """M <= GEMV_MAX_M. The config depends on M only through its bucket (1, 2, 4), so few specializations exist."""
    block_m = next_power_of_2(M)
    block_n = INTERPRETED_BLOCK_N if limits.interpreted else GEMV_BLOCK_N
    block_k = min(GEMV_BLOCK_K[block_m], max(16, next_power_of_2(K)))
    n_tiles, k_tiles = cdiv(N, block_n), cdiv(K, block_k)
    split_k = 1
    while not limits.interpreted and n_tiles * split_k < PROGRAMS_PER_SM * limits.num_sms and k_tiles >= 4 * split_k:
        split_k *= 2
    split_k = cdiv(k_tiles, cdiv(k_tiles, split_k))  # no split left without K-tiles
    return GemvConfig(block_m, block_n, block_k, split_k, num_warps=min(block_n, GEMV_BLOCK_N))


@triton.jit
def _row_stats(x_ptr, rows, row_mask, K, eps, STATS_BLOCK: tl.constexpr):
    """(mean, rstd) of rows `rows` ([R] row indices) of the row-major [*, K] matrix at x_ptr, in fp32.

    One pass in STATS_BLOCK-wide chunks: each chunk's mean and centered sum of squares are exact two-pass figures
    from registers, merged with Chan's parallel formula (stable for rows with a large mean, unlike E[x^2] - mean^2).
    Rows with row_mask False read as zeros.
    """
    cols = tl.arange(0, STATS_BLOCK)
    row_offsets = rows.to(tl.int64)[:, None] * K
    count = 0.0
    mean = rows.to(tl.float32) * 0.0  # [R]
    m2 = mean
    for start in range(0, K, STATS_BLOCK):
        in_row = start + cols < K
        chunk = tl.load(x_ptr + row_offsets + (start + cols)[None, :], mask=row_mask[:, None] & in_row[None, :],
                        other=0.0).to(tl.float32)  # [R, STATS_BLOCK]
        chunk_count = tl.minimum(K - start, STATS_BLOCK).to(tl.float32)
        chunk_mean = tl.sum(chunk, axis=1) / chunk_count
        centered = tl.where(in_row[None, :], chunk - chunk_mean[:, None], 0.0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += tl.sum(centered * centered, axis=1) + delta * delta * (count * chunk_count / total)
        count = total
    return mean, 1.0 / tl.sqrt(m2 / K + eps)


@triton.jit
def _normalized(x, mean, rstd, ln_weight, ln_bias, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """LayerNorm of an x tile (fp32, stats broadcast to it) rounded to the model dtype, as the unfused layer_norm
    writes it: the GEMM then sees exactly the operand a separate LayerNorm launch would have given it."""
    y = (x - mean) * rstd * ln_weight.to(tl.float32) + ln_bias.to(tl.float32)
    return cast_rounded(y, dtype, INTERPRETED_BF16)


@triton.jit
def _load_k_step(ptrs, mask, offs_k, k_tile, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The [.., .., BLOCK_K] tile of columns k_tile * BLOCK_K ... (masked past K unless K is a multiple)."""
    k0 = k_tile * BLOCK_K
    if EVEN_K:
        return tl.load(ptrs + k0, mask=mask, other=0.0)
    return tl.load(ptrs + k0, mask=mask & (k0 + offs_k < K)[None, None, :], other=0.0)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, tickets_ptr,
                 ln_weight_ptr, ln_bias_ptr, eps, M, N, K, tiles_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK: tl.constexpr,
                 SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    # x: [M, K], weight: [N, K], out/residual: [M, N], ln_weight/ln_bias: [K], partial: [SPLIT_K, M, N] fp32
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Tiles are 3-D: weights [1, BLOCK_N, BLOCK_K] (a row per warp, K contiguous), x [BLOCK_M, 1, BLOCK_K]. x is
    # loaded and normalized once per program and broadcast to the warps by Triton (through shared memory): giving
    # every warp its own copy of x instead costs 2.3x the instructions per weight element with the LayerNorm
    # (12.1 vs 5.2 at M = 1 in the sm_90 SASS of the K loop: the FP32 pipes would be ~77% busy at 4.3 TB/s).
    w_ptrs = weight_ptr + offs_n.to(tl.int64)[None, :, None] * K + offs_k[None, None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None] * K + offs_k[None, None, :]
    w_mask = n_mask[None, :, None]
    x_mask = m_mask[:, None, None]

    k_tiles = tl.cdiv(K, BLOCK_K)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    # The first weight step is in flight while the LayerNorm statistics are computed.
    w_next = _load_k_step(w_ptrs, w_mask, offs_k, tl.minimum(first, k_tiles - 1), K, BLOCK_K, EVEN_K)
    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, STATS_BLOCK)
        mean = mean[:, None, None]
        rstd = rstd[:, None, None]
        ln_w_ptrs = ln_weight_ptr + offs_k[None, None, :]
        ln_b_ptrs = ln_bias_ptr + offs_k[None, None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k_tile in range(first, last):
        w = w_next
        # prefetch the next step (the last step re-reads itself: an L1 hit, and no mask or branch)
        w_next = _load_k_step(w_ptrs, w_mask, offs_k, tl.minimum(k_tile + 1, last - 1), K, BLOCK_K, EVEN_K)
        x = _load_k_step(x_ptrs, x_mask, offs_k, k_tile, K, BLOCK_K, EVEN_K).to(tl.float32)
        if HAS_LN:
            # past K the parameters read as 0, so the normalized x is 0 there too
            ln_w = _load_k_step(ln_w_ptrs, True, offs_k, k_tile, K, BLOCK_K, EVEN_K)
            ln_b = _load_k_step(ln_b_ptrs, True, offs_k, k_tile, K, BLOCK_K, EVEN_K)
            x = _normalized(x, mean, rstd, ln_w, ln_b, x_ptr.dtype.element_ty, INTERPRETED_BF16).to(tl.float32)
        acc += x * w.to(tl.float32)

    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    finish_tile(y, offs_m, offs_n, M, N, pid_n, split, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                SPLIT_K, HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)


@functools.cache
def _launch_params(config: GemvConfig, N: int, K: int, flags: tuple[bool, bool, bool, bool, bool]) -> tuple:
    """(grid, tiles per split, constexprs + launch options) of one shape and epilogue, computed once."""
    has_ln, has_bias, gelu, has_residual, interpreted = flags
    n_tiles, k_tiles = cdiv(N, config.block_n), cdiv(K, config.block_k)
    # LayerNorm statistics: [BLOCK_M, STATS_BLOCK] chunks of STATS_VALUES_PER_THREAD per thread (unused without ln)
    stats_block = min(next_power_of_2(K), STATS_VALUES_PER_THREAD * 32 * config.num_warps // config.block_m) \
        if has_ln else 16
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, STATS_BLOCK=stats_block,
                SPLIT_K=config.split_k, EVEN_K=K % config.block_k == 0, HAS_LN=has_ln, HAS_BIAS=has_bias, GELU=gelu,
                HAS_RESIDUAL=has_residual, INTERPRETED_BF16=interpreted, num_warps=config.num_warps, num_stages=1)
    return (n_tiles, config.split_k), cdiv(k_tiles, config.split_k), meta


def launch_gemv(config: GemvConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, activation: str | None, out: torch.Tensor,
                ln: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Run the GEMV with an explicit config on validated arguments; ln = (ln_weight, ln_bias, eps) or None."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    flags = (ln is not None, bias is not None, activation == "gelu", residual is not None,
             interpreted_bf16(x.dtype, x.device))
    grid, tiles_per_split, meta = _launch_params(config, N, K, flags)
    partial = tickets = out  # placeholders for pointers the kernel never reads when split_k == 1
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
        tickets = ticket_counters(x.device, grid[0])
    ln_weight, ln_bias, eps = ln if ln is not None else (out, out, 0.0)
    _gemv_kernel[grid](x, weight, bias if bias is not None else out, residual if residual is not None else out, out,
                       partial, tickets, ln_weight, ln_bias, eps, M, N, K, tiles_per_split, **meta)
    return out
