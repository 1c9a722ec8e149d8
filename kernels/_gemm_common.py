"""Device helpers the two linear kernels (gemv.py, linear.py) share: LayerNorm prologue, fused epilogue, and the
split-K finish that reduces partial sums inside the GEMM launch (no second kernel, no float atomics).
"""

import triton
import triton.language as tl

from ._launch import cast_rounded


@triton.jit
def gelu(x):
    # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def row_stats(x_ptr, rows, row_mask, K, eps, STATS_BLOCK: tl.constexpr):
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
def normalized(x, mean, rstd, ln_weight, ln_bias, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """LayerNorm of an x tile (fp32, stats broadcast to it) rounded to the model dtype, as the unfused layer_norm
    writes it: the GEMM then sees exactly the operand a separate LayerNorm launch would have given it."""
    y = (x - mean) * rstd * ln_weight.to(tl.float32) + ln_bias.to(tl.float32)
    return cast_rounded(y, dtype, INTERPRETED_BF16)


@triton.jit
def epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   INTERPRETED_BF16: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_N] fp32 = x @ weight.T for rows offs_m, columns offs_n
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu(acc)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rounded(acc, out_ptr.dtype.element_ty, INTERPRETED_BF16), mask=mask)


@triton.jit
def finish_tile(acc, offs_m, offs_n, M, N, tile, split, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                INTERPRETED_BF16: tl.constexpr):
    """Store an output tile, or with SPLIT_K > 1 this split's share of it.

    Split-K: each split stores its fp32 partial to partial[split] ([SPLIT_K, M, N]), then takes a ticket on the
    tile's counter; the split that draws the last ticket adds the SPLIT_K partials in split order (0, 1, ...), so the
    sum's rounding never depends on which split finished last: bit-identical outputs run to run. It then applies
    the epilogue and resets the counter to 0 for the next launch. The host keeps SPLIT_K * M * N < 2**31.
    """
    if SPLIT_K == 1:
        epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU, HAS_RESIDUAL,
                       INTERPRETED_BF16)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(partial_ptr + (offs + split * M * N), acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket (a release by one thread)
        ticket = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):  # .cg: read the other splits' partials from L2, never a stale L1
                total += tl.load(partial_ptr + (offs + s * M * N), mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(tickets_ptr + tile, 0)
            epilogue_store(total, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU,
                           HAS_RESIDUAL, INTERPRETED_BF16)
