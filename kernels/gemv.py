"""Skinny-M linear (GEMV): `act(LN(x) @ weight.T + bias) + residual` for M <= GEMV_MAX_M rows, on CUDA cores.

At decode batch sizes a linear layer is a weight stream: every weight byte is read once and used M times. The
kernel is built for that: weight-row tiles of BLOCK_N = 16 rows (one per warp) are walked in K-steps of 512 bytes per
row (256 at M = 4: one 16-byte load per lane, 8 bytes at M = 4), the next step's weights in flight while the current
one is multiplied; products accumulate elementwise in fp32 and are reduced across K once per tile (no shuffles inside
the loop). No tensor cores and no shared-memory staging of weights: they go straight from HBM to registers.

Filling the chip: the launch is persistent. Its work is n_tiles x k_tiles units (one K-step of one tile), and each
of `programs` programs takes an equal run of consecutive units, crossing tile boundaries, so every SM streams until
the end and none starts a second wave. Programs are 16 warps capped at 64 registers per thread (`maxnreg`), so
exactly 2 fill an SM's register file, and there are 2 per SM: one wave, shares of at least 4 units (K-steps halve
until there are enough), so no share is more than a quarter unit above the mean. A tile whose units fall to several
programs is reduced inside the launch in program order (`finish_shared_tile`): deterministic, no second kernel. The
sm_90 occupancy table (engine/model/decode_occupancy.py) checks registers, spills, residency and shares at the
2.7B shapes; the cap is where ptxas fits each M bucket without spilling (at 512-byte steps M = 4 spilled).

Crossover (GEMV_MAX_M = 4), H200 fp16 figures: streaming weights at the measured ~4.3 TB/s delivers 2.15e12
weight elements/s, each needing M fp32 FMAs plus one conversion. The FP32 pipes issue ~33e12 FMA/s (67 TFLOP/s),
so M = 4 keeps them ~26% busy (room for the conversions, x loads and address math), M = 8 ~52% and M = 16 ~103%:
compute-bound. From M = 5 the tensor-core tile kernel (linear.py, 16-row tiles) reads the same bytes with its
arithmetic free, so it takes over there.

LayerNorm prologue (HAS_LN): every program computes its rows' statistics over K once, in one pass from L2 (while its
first weight step is in flight), and normalizes each x step as it streams: M x K extra bytes from L2 per program,
far cheaper than a separate LayerNorm launch and the gap before it.

Programmatic dependent launch (sm_90, `wait_for_prior_grid`): a program issues its first weight loads, then waits
for the previous kernel (whose output may be x or the residual), so its weight stream starts while that one drains.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._gemm_common import finish_shared_tile
from ._launch import (
    DeviceLimits,
    cast_rounded,
    cdiv,
    interpreted_bf16,
    next_power_of_2,
    pdl_meta,
    register_cap,
    ticket_counters,
    uses_pdl,
    wait_for_prior_grid,
)

GEMV_MAX_M = 4
GEMV_BLOCK_N = 16  # weight rows per tile, one per warp
GEMV_NUM_WARPS = 16
INTERPRETED_BLOCK_N = 64  # the CPU interpreter pays per program: fewer, larger ones
STEP_BYTES = {1: 512, 2: 256, 4: 256}  # bytes of each weight row per K-step, by BLOCK_M (64 registers fit these)
MIN_STEP_BYTES = 128  # K-steps halve for more units down to this: 4 bytes per lane
PROGRAMS_PER_SM = 2  # programs of GEMV_NUM_WARPS warps at MAX_REGISTERS fill an SM's 64K registers
MAX_REGISTERS = 65536 // (PROGRAMS_PER_SM * GEMV_NUM_WARPS * 32)  # per thread: 64
UNITS_PER_PROGRAM = 4  # at least this many units per program, so that equal shares differ by <= 1 / 4 of one
STATS_VALUES_PER_THREAD = 8  # LayerNorm statistics read [BLOCK_M, STATS_BLOCK] chunks of this many per thread


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # 1, 2 or 4: x rows, all in every program
    block_n: int
    block_k: int
    programs: int  # persistent programs, each an equal run of the n_tiles x k_tiles (tile, K-step) units
    num_warps: int


def choose_gemv_config(M: int, N: int, K: int, elem_bytes: int, limits: DeviceLimits) -> GemvConfig:
    """M <= GEMV_MAX_M. The config depends on M only through its bucket (1, 2, 4), so few specializations exist.
    Under the interpreter, one program per tile (no shared tiles: it runs programs one by one)."""
    block_m = next_power_of_2(M)
    max_block_k = max(16, next_power_of_2(K))
    block_k = min(STEP_BYTES[block_m] // elem_bytes, max_block_k)
    if limits.interpreted:
        block_n = INTERPRETED_BLOCK_N
        return GemvConfig(block_m, block_n, block_k, cdiv(N, block_n), num_warps=GEMV_NUM_WARPS)
    n_tiles, most_programs = cdiv(N, GEMV_BLOCK_N), PROGRAMS_PER_SM * limits.num_sms
    while block_k * elem_bytes > MIN_STEP_BYTES and n_tiles * cdiv(K, block_k) < UNITS_PER_PROGRAM * most_programs:
        block_k //= 2
    programs = min(n_tiles * cdiv(K, block_k), most_programs)
    return GemvConfig(block_m, GEMV_BLOCK_N, block_k, programs, num_warps=GEMV_NUM_WARPS)


def work_shares(config: GemvConfig, N: int, K: int) -> tuple[int, int]:
    """(units, shares that start inside a tile): how a launch of `config` on [N, K] weights divides its work; with
    no share starting inside a tile, no tile is shared and the launch needs no partials or tickets."""
    k_tiles = cdiv(K, config.block_k)
    units = cdiv(N, config.block_n) * k_tiles
    starts = [p * units // config.programs for p in range(1, config.programs)]
    return units, sum(start % k_tiles != 0 for start in starts)


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
def _load_weights(w_ptrs, tile, k_tile, offs_n, offs_k, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """The [1, BLOCK_N, BLOCK_K] weights of K-step k_tile of weight-row tile `tile` (w_ptrs: tile 0's first step),
    masked past N and past K unless they are multiples of the tile."""
    ptrs = w_ptrs + (tile.to(tl.int64) * BLOCK_N * K + k_tile * BLOCK_K)
    if EVEN_N and EVEN_K:
        return tl.load(ptrs)
    mask = (tile * BLOCK_N + offs_n < N)[None, :, None] & (k_tile * BLOCK_K + offs_k < K)[None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, tickets_ptr,
                 ln_weight_ptr, ln_bias_ptr, eps, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED_BF16: tl.constexpr, PDL: tl.constexpr):
    # x: [M, K], weight: [N, K], out/residual: [M, N], ln_weight/ln_bias: [K],
    # partial: [programs, 2, BLOCK_M, BLOCK_N] fp32 (a program's first and last tile, when it shares them)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_units = tl.cdiv(N, BLOCK_N) * k_tiles  # the host keeps it and N * K below 2**31
    # This program's equal share of the (weight-row tile, K-step) units, in row-major order.
    first = (pid.to(tl.int64) * num_units // programs).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * num_units // programs).to(tl.int32)
    tile = first // k_tiles
    k_tile = first - tile * k_tiles
    # Tiles are 3-D: weights [1, BLOCK_N, BLOCK_K] (a row per warp, K contiguous: 16 bytes per lane), x
    # [BLOCK_M, 1, BLOCK_K]. x is loaded and normalized once per program and K-step and broadcast to the warps by
    # Triton; the products accumulate elementwise in fp32 and are reduced across K once per tile.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    w_ptrs = weight_ptr + offs_n.to(tl.int64)[None, :, None] * K + offs_k[None, None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None] * K + offs_k[None, None, :]
    x_mask = m_mask[:, None, None]

    # The first weight step is in flight while this program waits for the previous kernel (programmatic dependent
    # launch: weights are never written by it) and computes the LayerNorm statistics.
    w_next = _load_weights(w_ptrs, tile, k_tile, offs_n, offs_k, N, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
    wait_for_prior_grid(PDL)
    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, STATS_BLOCK)
        mean = mean[:, None, None]
        rstd = rstd[:, None, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for unit in range(first, end):
        w = w_next
        next_k_tile = k_tile + 1
        tile_ends = next_k_tile == k_tiles
        next_tile = tile + tile_ends
        next_k_tile = tl.where(tile_ends, 0, next_k_tile)
        # prefetch the next unit (the last one re-reads itself: an L1 hit, and no branch)
        share_ends = unit + 1 == end
        w_next = _load_weights(w_ptrs, tl.where(share_ends, tile, next_tile), tl.where(share_ends, k_tile, next_k_tile),
                               offs_n, offs_k, N, K, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K)
        k0 = k_tile * BLOCK_K
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=x_mask & (k0 + offs_k < K)[None, None, :], other=0.0)
        if HAS_LN:  # past K the parameters read as 0, so the normalized x is 0 there too
            k_mask = (k0 + offs_k < K)[None, None, :]
            ln_w = tl.load(ln_weight_ptr + k0 + offs_k[None, None, :], mask=k_mask, other=0.0)
            ln_b = tl.load(ln_bias_ptr + k0 + offs_k[None, None, :], mask=k_mask, other=0.0)
            x = _normalized(x.to(tl.float32), mean, rstd, ln_w, ln_b, x_ptr.dtype.element_ty, INTERPRETED_BF16)
        acc += x.to(tl.float32) * w.to(tl.float32)
        if tile_ends | share_ends:  # this program's share of the tile ends here
            finish_shared_tile(tl.sum(acc, axis=2), offs_m, tile * BLOCK_N + offs_n, M, N, tile, k_tiles, num_units,
                               first, pid, programs, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                               HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        tile = next_tile
        k_tile = next_k_tile


def launch_flags(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, activation: str | None,
                 ln: tuple[torch.Tensor, torch.Tensor, float] | None) -> tuple[bool, bool, bool, bool, bool, bool]:
    """(has_ln, has_bias, gelu, has_residual, interpreted bf16, pdl): what selects a GEMV launch's variant."""
    return (ln is not None, bias is not None, activation == "gelu", residual is not None,
            interpreted_bf16(x.dtype, x.device), uses_pdl(x.device))


def variant_meta(config: GemvConfig, K: int, has_ln: bool, interpreted: bool) -> dict:
    """The constexprs and launch options both GEMVs set alike: the LayerNorm statistics' chunk ([BLOCK_M,
    STATS_BLOCK], STATS_VALUES_PER_THREAD per thread; unused without ln), one stage, the register cap."""
    stats_block = min(next_power_of_2(K), STATS_VALUES_PER_THREAD * 32 * config.num_warps // config.block_m) \
        if has_ln else 16
    meta = dict(STATS_BLOCK=stats_block, num_stages=1)
    if not interpreted and config.num_warps == GEMV_NUM_WARPS:
        meta |= register_cap(MAX_REGISTERS)
    return meta


def shared_tile_buffers(config: GemvConfig, N: int, shares_tiles: bool, out: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, ticket counters) for programs that share output tiles; else `out` twice, placeholders for
    pointers the kernel never reads."""
    if not shares_tiles:
        return out, out
    partial = torch.empty((config.programs, 2, config.block_m, config.block_n), dtype=torch.float32,
                          device=out.device)
    return partial, ticket_counters(out.device, cdiv(N, config.block_n))


@functools.cache
def _launch_params(config: GemvConfig, N: int, K: int, flags: tuple[bool, bool, bool, bool, bool, bool]) -> tuple:
    """(whether programs share tiles, constexprs + launch options) of one shape and epilogue, computed once."""
    has_ln, has_bias, gelu, has_residual, interpreted, pdl = flags
    units, starts_inside_tiles = work_shares(config, N, K)
    if not 1 <= config.programs <= units or N * K >= 2**31:
        raise ValueError(f"GEMV config {config} on weights [{N}, {K}]: needs 1 to {units} programs (one unit of "
                         f"work each at least) and N * K < 2**31")
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                EVEN_N=N % config.block_n == 0, EVEN_K=K % config.block_k == 0, HAS_LN=has_ln, HAS_BIAS=has_bias,
                GELU=gelu, HAS_RESIDUAL=has_residual, INTERPRETED_BF16=interpreted, num_warps=config.num_warps,
                **pdl_meta(pdl), **variant_meta(config, K, has_ln, interpreted))
    return starts_inside_tiles > 0, meta


def launch_gemv(config: GemvConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None, activation: str | None, out: torch.Tensor,
                ln: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Run the GEMV with an explicit config on validated arguments; ln = (ln_weight, ln_bias, eps) or None."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    shares_tiles, meta = _launch_params(config, N, K, launch_flags(x, bias, residual, activation, ln))
    partial, tickets = shared_tile_buffers(config, N, shares_tiles, out)
    ln_weight, ln_bias, eps = ln if ln is not None else (out, out, 0.0)
    _gemv_kernel[(config.programs,)](x, weight, bias if bias is not None else out,
                                     residual if residual is not None else out, out, partial, tickets, ln_weight,
                                     ln_bias, eps, M, N, K, **meta)
    return out
