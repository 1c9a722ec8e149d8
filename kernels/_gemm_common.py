"""Device helpers the linear kernels (gemv.py, linear.py and their quantized twins) share: the tile GEMMs' grouped
tile order and split-K range, the fused epilogue, and the split-K finish that reduces partial sums inside the GEMM
launch (no second kernel, no float atomics).
"""

import triton
import triton.language as tl

from ._launch import cast_rounded


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid: GROUP_M row tiles walk the column tiles together, so the weight tiles they
    share are read while still in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_per_group) % group_size_m, (pid % pids_per_group) // group_size_m


@triton.jit
def split_k_tiles(K, split, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[start, end) of the K-tiles split `split` of SPLIT_K reduces."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_tile_start = split * tiles_per_split
    return k_tile_start, tl.minimum(k_tile_start + tiles_per_split, k_tiles)


@triton.jit
def gelu(x):
    # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


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


@triton.jit
def finish_shared_tile(y, offs_m, offs_n, M, N, tile, k_tiles, num_units, first, pid, programs, partial_ptr,
                       tickets_ptr, bias_ptr, residual_ptr, out_ptr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """Store output tile `tile` (columns offs_n), or this program's share of it, for a launch whose `programs`
    programs each took an equal run of its num_units (tile, K-step) units, program p from unit
    p * num_units // programs (`first` for this one); a tile has k_tiles units.

    A tile whose units all fell to one program is stored at once. A shared one: each program stores its fp32 partial
    y ([BLOCK_M, BLOCK_N]) in its slot of partial ([programs, 2, BLOCK_M, BLOCK_N]: slot 0 for a program's first tile,
    1 for its last), then takes a ticket on the tile's counter; the one that draws the last ticket adds the partials
    in program order, so the sum's rounding never depends on which program finished last: bit-identical outputs run
    to run. It then applies the epilogue and resets the counter to 0 for the next launch.
    """
    tile_first = tile * k_tiles
    # the program holding unit u is ((u + 1) * programs - 1) // num_units
    first_program = ((tile_first + 1) * programs - 1) // num_units
    last_program = ((tile_first + k_tiles) * programs - 1) // num_units
    if first_program == last_program:
        epilogue_store(y, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU, HAS_RESIDUAL,
                       INTERPRETED_BF16)
    else:
        BLOCK_M: tl.constexpr = y.shape[0]
        BLOCK_N: tl.constexpr = y.shape[1]
        in_slot = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        slot = (first // k_tiles != tile).to(tl.int64)
        tl.store(partial_ptr + (pid * 2 + slot) * BLOCK_M * BLOCK_N + in_slot, y)
        tl.debug_barrier()  # every thread's partial is stored before the ticket (a release by one thread)
        ticket = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel")
        if ticket == last_program - first_program:
            total = tl.zeros_like(y)
            for program in range(first_program, last_program + 1):  # .cg: from L2, never a stale L1 line
                slot = (program * num_units // programs // k_tiles != tile).to(tl.int64)
                total += tl.load(partial_ptr + (program * 2 + slot) * BLOCK_M * BLOCK_N + in_slot, cache_modifier=".cg")
            tl.store(tickets_ptr + tile, 0)
            epilogue_store(total, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU,
                           HAS_RESIDUAL, INTERPRETED_BF16)
