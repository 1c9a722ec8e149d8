"""Triton GEMM `act(x @ weight.T + bias) + residual` with the epilogue fused, configured per problem size.

Two regimes share one kernel:
- decode (M <= 256): bandwidth-bound, the job is to stream every weight byte once. Thin M-tiles, wide K-tiles,
  and when there are too few output tiles to keep every SM streaming, K is split across programs (split-K).
  Each split writes its fp32 partial sum to its own slice of a workspace and a second kernel adds the slices
  in a fixed order, so results are bit-for-bit deterministic (no atomics).
- prefill (M in the thousands): compute-bound, 128-wide tiles on tensor cores, a deep load pipeline and
  grouped tile order so neighbouring programs share weight tiles in L2.
The config is a deterministic function of (M, N, K, dtype, device) — no autotuning on the first call.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (
    cast_rounded,
    check_tensor,
    check_triton_device,
    dot,
    interpreted_bf16,
    num_sms,
    shared_memory_bytes,
)
from ._reference_gemm import reference_linear

ACTIVATIONS = (None, "gelu")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs sharing one output tile along K; > 1 adds the fixed-order reduction kernel
    group_m: int  # M-tiles walked together per N-column, so their weight tiles are reused from L2
    num_warps: int
    num_stages: int


@triton.jit
def _gelu(x):
    # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr,
                    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    INTERPRETED_BF16: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_N] fp32 = x @ weight.T for rows offs_m, columns offs_n
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rounded(acc, out_ptr.dtype.element_ty, INTERPRETED_BF16), mask=mask)


@triton.jit
def _linear_kernel(x_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, M, N, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    # x: [M, K], weight: [N, K], out/residual: [M, N], partial: [SPLIT_K, M, N] fp32 (used when SPLIT_K > 1)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones, so loads need no M/N mask; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_tile_start = split * tiles_per_split
    k_tile_end = tl.minimum(k_tile_start + tiles_per_split, k_tiles)
    x_ptrs = x_ptr + rows[:, None] * K + (k_tile_start * BLOCK_K + offs_k)[None, :]
    w_ptrs = weight_ptr + cols[:, None] * K + (k_tile_start * BLOCK_K + offs_k)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(k_tile_start, k_tile_end):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            w_tile = tl.load(w_ptrs)
        else:
            k_mask = offs_k[None, :] < K - k_tile * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=k_mask, other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_mask, other=0.0)
        # x_tile: [BLOCK_M, BLOCK_K], w_tile: [BLOCK_N, BLOCK_K]
        acc = dot(x_tile, tl.trans(w_tile), acc, INPUT_PRECISION, INTERPRETED_BF16)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU, HAS_RESIDUAL,
                        INTERPRETED_BF16)
    else:
        partial_offs = split.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(partial_ptr + partial_offs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, residual_ptr, out_ptr, M, N,
                           SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           INTERPRETED_BF16: tl.constexpr):
    # partial: [SPLIT_K, M, N] fp32, summed in split order (deterministic), then the epilogue.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(SPLIT_K):
        acc += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        partial_ptr += M * N
    _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, residual_ptr, out_ptr, HAS_BIAS, GELU, HAS_RESIDUAL,
                        INTERPRETED_BF16)


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The tile config `linear` uses for an [M, K] x [N, K]^T product on `device`."""
    return choose_config(M, N, K, dtype.itemsize, num_sms(device), shared_memory_bytes(device))


def choose_config(M: int, N: int, K: int, elem_bytes: int, sm_count: int, smem_bytes: int) -> GemmConfig:
    """A small table keyed on M, fitted to N, K, the SM count and the shared memory a block may use."""
    if M <= 64:  # decode: a thin M-tile, long K-tiles so each program streams big contiguous weight rows
        block_m, block_n, block_k = max(16, triton.next_power_of_2(M)), 64, 256 // elem_bytes
        group_m, num_warps, num_stages = 1, 4, 4
    elif M <= 256:  # large decode batch: still mostly weight traffic, tensor cores start to matter
        block_m, block_n, block_k = 64, 128, 128 // elem_bytes
        group_m, num_warps, num_stages = 8, 4, 4
    else:  # prefill: compute-bound
        block_m, block_n, block_k = 128, 256 if elem_bytes == 2 else 128, 128 // elem_bytes
        group_m, num_warps, num_stages = 8, 8, 3
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))

    # Split K while the output tiles alone leave SMs idle, keeping >= 4 K-tiles per split for the pipeline.
    split_k = 1
    if M <= 256:
        out_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        k_tiles = triton.cdiv(K, block_k)
        while out_tiles * split_k < sm_count and k_tiles // (2 * split_k) >= 4 and split_k < 16:
            split_k *= 2

    stage_bytes = (block_m + block_n) * block_k * elem_bytes
    num_stages = max(1, min(num_stages, smem_bytes // stage_bytes))
    return GemmConfig(block_m, block_n, block_k, split_k, group_m, num_warps, num_stages)


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, activation: str | None, out: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [N, {K}] to match x's K = {K}")
    if N == 0 or K == 0:
        raise ValueError(f"linear needs N >= 1 and K >= 1, got weight shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(N,), dtype=x.dtype, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=(M, N), dtype=x.dtype, device=x.device)
    if out is not None:
        check_tensor("out", out, shape=(M, N), dtype=x.dtype, device=x.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def launch_linear(config: GemmConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, activation: str | None, out: torch.Tensor) -> torch.Tensor:
    """Run the GEMM with an explicit config on already-validated arguments (tests force every path here)."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    dummy = out  # pointer for absent bias / residual / workspace; never read when its flag is off
    flags = dict(HAS_BIAS=bias is not None, GELU=activation == "gelu", HAS_RESIDUAL=residual is not None,
                 INTERPRETED_BF16=interpreted_bf16(x.dtype, x.device))
    partial = dummy
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), config.split_k)
    _linear_kernel[grid](
        x, weight, bias if bias is not None else dummy, residual if residual is not None else dummy, out, partial,
        M, N, K,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        GROUP_M=config.group_m, EVEN_K=K % config.block_k == 0,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **flags,
    )
    if config.split_k > 1:
        block_m = min(16, triton.next_power_of_2(M))
        reduce_grid = (triton.cdiv(M, block_m), triton.cdiv(N, 256))
        _split_k_reduce_kernel[reduce_grid](
            partial, bias if bias is not None else dummy, residual if residual is not None else dummy, out, M, N,
            SPLIT_K=config.split_k, BLOCK_M=block_m, BLOCK_N=256, num_warps=4, **flags,
        )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, activation: str | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual in one GEMM; x: [M, K], weight: [N, K] -> [M, N] in x's dtype.

    activation: None or "gelu" (exact erf GELU). Accumulates in fp32 and rounds once. `out` ([M, N], optional)
    receives the result; it may be `residual` itself (in-place residual add), never `x` or `weight`.
    """
    _check_linear_args(x, weight, bias, residual, activation, out)
    check_triton_device("x", x)
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return launch_linear(pick_config(M, N, K, x.dtype, x.device), x, weight, bias, residual, activation, out)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, activation: str | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch `linear`: the same math in fp32, rounded to x's dtype at the end (see _reference_gemm.py)."""
    _check_linear_args(x, weight, bias, residual, activation, out)
    y = reference_linear(x, weight, bias, residual, activation)
    return y if out is None else out.copy_(y)
