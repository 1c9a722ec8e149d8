"""The model's linear layers: `act(x @ weight.T + bias) + residual` (`linear`) and the same after a LayerNorm of x
(`ln_linear`), epilogues fused, dispatched on the number of rows M (configs are per M bucket, cached per shape):

- M <= GEMV_MAX_M (4): the CUDA-core GEMV of gemv.py (see there for why 4), LayerNorm fused in its prologue.
- M <= 256 (decode batches): tensor-core tiles with a thin M (16, 32 or 64 rows), wide K-tiles, and K split across
  programs while the output tiles alone leave SMs idle; the splits' fp32 partials are reduced inside the launch in
  split order (`finish_tile`), deterministic and without a second kernel.
- M > 256 (prefill): compute-bound, 128x128 tiles on tensor cores with a deep load pipeline and grouped tile order
  (neighbouring programs share weight tiles in L2).

LayerNorm fusion crossover (fused up to GEMV_MAX_M rows, a separate LayerNorm launch above): a fused prologue makes
every program recompute its rows' statistics over all of K, BLOCK_M * SPLIT_K / BLOCK_N extra bytes per weight
byte (from L2), and its latency comes before the first weight load. In the GEMV that is 1/16 to 1/2 and one chunk
per thread. In a 16 x 64 tile with split-K 2 (qkv at M = 16) it is 1/2, the tile would need [16, K] values in
flight for the statistics (at 4 warps: dozens of dependent L2 round trips, or registers it does not have: ptxas
spilled 1.5-33 KB trying at M = 16..64), while a separate launch costs ~2 us of gap plus a kernel that reads each
row once; at prefill sizes the fused reads would be 16x the weights. So the tile path keeps LayerNorm separate.

Prefill tile (M > 256): 128x128x64, 8 warps: M = 2048 on N = 2560 makes 16 x 20 = 320 tiles, 2.4 waves on an
H200's 132 SMs (128x256 made 160, 1.2 waves, and spilled registers with the GELU and residual epilogues).
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._gemm_common import finish_tile, grouped_tile, split_k_tiles
from ._launch import (
    SPLIT_MAX_ROWS,
    DeviceLimits,
    cdiv,
    check_tensor,
    check_triton_device,
    device_limits,
    dot,
    interpreted_bf16,
    next_power_of_2,
    pdl_meta,
    ticket_counters,
    uses_pdl,
    wait_for_prior_grid,
)
from ._reference_gemm import reference_linear
from .gemv import GEMV_MAX_M, GemvConfig, choose_gemv_config, launch_gemv
from .gemv_quantized import choose_quantized_gemv_config, launch_quantized_gemv
from .layernorm import launch_layer_norm, reference_layer_norm
from .linear_quantized import launch_quantized_linear, quantized_gemm_config
from .quantized_weight import QuantizedWeight, check_quantized_weight, dequantize_ref

ACTIVATIONS = (None, "gelu")
M_BUCKETS = (1, 2, 4, 16, 32, 64, 256)  # decode buckets (configs are fixed within one); above 256, one prefill bucket
PREFILL_BUCKET = M_BUCKETS[-1] + 1


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs sharing one output tile along K; > 1 reduces their partials in-launch
    group_m: int  # M-tiles walked together per N-column, so their weight tiles are reused from L2
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LinearChoice:
    """How `linear` / `ln_linear` run one shape: the GEMV (LayerNorm fused) or the tile GEMM (LayerNorm apart)."""

    gemv: GemvConfig | None
    gemm: GemmConfig | None


def m_bucket(M: int) -> int:
    """The M_BUCKETS entry covering M, or PREFILL_BUCKET above the last one."""
    for bucket in M_BUCKETS:
        if M <= bucket:
            return bucket
    return PREFILL_BUCKET


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, tickets_ptr, M, N, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
                   PDL: tl.constexpr):
    # x: [M, K], weight: [N, K], out/residual: [M, N], partial: [SPLIT_K, M, N] fp32 (used when SPLIT_K > 1)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    wait_for_prior_grid(PDL)  # x and the residual may be the previous kernel's output
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones, so loads need no M/N mask; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    k_tile_start, k_tile_end = split_k_tiles(K, split, BLOCK_K, SPLIT_K)
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

    finish_tile(acc, offs_m, offs_n, M, N, pid, split, partial_ptr, tickets_ptr, bias_ptr, residual_ptr, out_ptr,
                SPLIT_K, HAS_BIAS, GELU, HAS_RESIDUAL, INTERPRETED_BF16)


@functools.cache
def _bucket_config(bucket: int, N: int, K: int, elem_bytes: int, sm_count: int, smem_bytes: int) -> GemmConfig:
    if bucket <= 64:  # decode: a thin M-tile, long K-tiles so each program streams big contiguous weight rows
        block_m, block_n, block_k = max(16, bucket), 64, 256 // elem_bytes
        group_m, num_warps, num_stages = 1, 4, 4
    elif bucket <= 256:  # large decode batch: still mostly weight traffic, tensor cores start to matter
        block_m, block_n, block_k = 64, 128, 128 // elem_bytes
        group_m, num_warps, num_stages = 8, 4, 4
    else:  # prefill: compute-bound
        block_m, block_n, block_k = 128, 128, 128 // elem_bytes
        group_m, num_warps, num_stages = 8, 8, 4
    block_n = min(block_n, max(16, next_power_of_2(N)))
    block_k = min(block_k, max(16, next_power_of_2(K)))

    # Split K while the output tiles alone leave SMs idle, keeping >= 4 K-tiles per split for the pipeline. Sized
    # for the bucket's largest M, so one config (one compiled kernel) serves the whole bucket.
    split_k = 1
    if bucket <= SPLIT_MAX_ROWS:
        out_tiles = cdiv(bucket, block_m) * cdiv(N, block_n)
        k_tiles = cdiv(K, block_k)
        while out_tiles * split_k < sm_count and k_tiles // (2 * split_k) >= 4 and split_k < 16:
            split_k *= 2

    stage_bytes = (block_m + block_n) * block_k * elem_bytes
    num_stages = max(1, min(num_stages, smem_bytes // stage_bytes))
    return GemmConfig(block_m, block_n, block_k, split_k, group_m, num_warps, num_stages)


@functools.cache
def _cached_choice(bucket: int, N: int, K: int, elem_bytes: int, limits: DeviceLimits) -> LinearChoice:
    if bucket <= GEMV_MAX_M:
        return LinearChoice(choose_gemv_config(bucket, N, K, elem_bytes, limits), None)
    return LinearChoice(None, _bucket_config(bucket, N, K, elem_bytes, limits.num_sms, limits.shared_memory_bytes))


def choose_linear(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearChoice:
    """The kernel and config `linear` and `ln_linear` run for this shape on `device`."""
    return _cached_choice(m_bucket(M), N, K, dtype.itemsize, device_limits(device))


@functools.cache
def _cached_quantized_choice(bucket: int, N: int, K: int, elem_bytes: int, bits: int, group_size: int | None,
                           limits: DeviceLimits) -> LinearChoice:
    if bucket <= GEMV_MAX_M:
        return LinearChoice(choose_quantized_gemv_config(bucket, N, K, bits, elem_bytes, limits), None)
    dense = _bucket_config(bucket, N, K, elem_bytes, limits.num_sms, limits.shared_memory_bytes)
    return LinearChoice(None, quantized_gemm_config(dense, group_size))


def choose_quantized_linear(M: int, weight: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> LinearChoice:
    """The kernel and config `linear` and `ln_linear` run for x [M, K] of `dtype` on `device` and this weight."""
    N, K = weight.shape
    return _cached_quantized_choice(m_bucket(M), N, K, dtype.itemsize, weight.bits, weight.group_size,
                                  device_limits(device))


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, activation: str | None, out: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2)
    if isinstance(weight, QuantizedWeight):
        check_quantized_weight("weight", weight)
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device}, expected {x.device}")
    else:
        check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    M, K = x.shape
    N, weight_k = weight.shape
    if weight_k != K:
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


def _check_ln_args(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> None:
    K = x.shape[1]
    check_tensor("ln_weight", ln_weight, shape=(K,), dtype=x.dtype, device=x.device)
    check_tensor("ln_bias", ln_bias, shape=(K,), dtype=x.dtype, device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


@functools.cache
def _launch_params(config: GemmConfig, N: int, K: int, flags: tuple[bool, bool, bool, bool, bool, bool]) -> tuple:
    """(output-tile columns, constexprs + launch options) of one shape and epilogue, computed once."""
    has_bias, gelu, has_residual, fp32, interpreted, pdl = flags
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                GROUP_M=config.group_m, EVEN_K=K % config.block_k == 0, HAS_BIAS=has_bias, GELU=gelu,
                HAS_RESIDUAL=has_residual, INPUT_PRECISION="ieee" if fp32 else "tf32", INTERPRETED_BF16=interpreted,
                num_warps=config.num_warps, num_stages=config.num_stages, **pdl_meta(pdl))
    return cdiv(N, config.block_n), meta


def launch_linear(config: GemmConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, activation: str | None, out: torch.Tensor) -> torch.Tensor:
    """Run the tile GEMM with an explicit config on validated arguments (tests force every path here)."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0:
        return out
    flags = (bias is not None, activation == "gelu", residual is not None, x.dtype == torch.float32,
             interpreted_bf16(x.dtype, x.device), uses_pdl(x.device))
    n_tiles, meta = _launch_params(config, N, K, flags)
    out_tiles = cdiv(M, config.block_m) * n_tiles
    partial = tickets = out  # placeholders for pointers the kernel never reads when split_k == 1
    if config.split_k > 1:
        partial = torch.empty((config.split_k, M, N), dtype=torch.float32, device=x.device)
        tickets = ticket_counters(x.device, out_tiles)
    _linear_kernel[(out_tiles, config.split_k)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out, partial,
        tickets, M, N, K, **meta)
    return out


def _run(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None,
         residual: torch.Tensor | None, activation: str | None, out: torch.Tensor | None,
         ln: tuple[torch.Tensor, torch.Tensor, float] | None) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    quantized = isinstance(weight, QuantizedWeight)
    choice = choose_quantized_linear(M, weight, x.dtype, x.device) if quantized \
        else choose_linear(M, N, K, x.dtype, x.device)
    if choice.gemv is not None:
        gemv = launch_quantized_gemv if quantized else launch_gemv
        return gemv(choice.gemv, x, weight, bias, residual, activation, out, ln)
    if ln is not None:  # the tile GEMM normalizes nothing itself: a LayerNorm launch first, each row read once
        normed = torch.empty_like(x)
        launch_layer_norm(x, ln[0], ln[1], ln[2], normed)
        x = normed
    gemm = launch_quantized_linear if quantized else launch_linear
    return gemm(choice.gemm, x, weight, bias, residual, activation, out)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, *, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, activation: str | None = None,
           out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual in one launch; x: [M, K], weight: [N, K] -> [M, N] in x's dtype.

    weight: a tensor of x's dtype, or a QuantizedWeight (int8 / int4 codes), dequantized inside the same launch.

    activation: None or "gelu" (exact erf GELU). Accumulates in fp32 and rounds once. `out` ([M, N], optional)
    receives the result; it may be `residual` itself (in-place residual add), never `x` or `weight`.
    checked=False skips the argument checks (a few microseconds): only for arguments valid by construction.
    """
    if checked:
        _check_linear_args(x, weight, bias, residual, activation, out)
        check_triton_device("x", x)
    return _run(x, weight, bias, residual, activation, out, None)


def ln_linear(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
              weight: torch.Tensor | QuantizedWeight, *,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, activation: str | None = None,
              out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
    """linear(layer_norm(x, ln_weight, ln_bias, eps), weight, ...): x: [M, K], ln_weight/ln_bias: [K].

    The normalized x is rounded to x's dtype as layer_norm writes it; up to GEMV_MAX_M rows the GEMV computes it
    in its prologue (one launch), above that a LayerNorm launch comes first. `out` may be `residual`, never x.
    """
    if checked:
        _check_linear_args(x, weight, bias, residual, activation, out)
        _check_ln_args(x, ln_weight, ln_bias, eps)
        check_triton_device("x", x)
    return _run(x, weight, bias, residual, activation, out, (ln_weight, ln_bias, float(eps)))


def linear_ref(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, *, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, activation: str | None = None,
               out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
    """Plain-PyTorch `linear`: the same math in fp32, rounded to x's dtype at the end (always checks; how it is
    computed fast on a CPU: _reference_gemm.py). A QuantizedWeight is dequantized first (dequantize_ref, in its
    scales' dtype, then x's)."""
    _check_linear_args(x, weight, bias, residual, activation, out)
    y = reference_linear(x, _dense(weight, x.dtype), bias, residual, activation)
    return y if out is None else out.copy_(y)


def ln_linear_ref(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                  weight: torch.Tensor | QuantizedWeight, *, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, activation: str | None = None, out: torch.Tensor | None = None,
                  checked: bool = True) -> torch.Tensor:
    """Plain-PyTorch `ln_linear`: layer_norm_ref (rounded to x's dtype), then linear_ref (always checks, once: the
    reference engine calls it twice per layer per step)."""
    _check_linear_args(x, weight, bias, residual, activation, out)
    _check_ln_args(x, ln_weight, ln_bias, eps)
    y = reference_linear(reference_layer_norm(x, ln_weight, ln_bias, eps), _dense(weight, x.dtype), bias, residual,
                         activation)
    return y if out is None else out.copy_(y)


def _dense(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_ref(weight).to(dtype) if isinstance(weight, QuantizedWeight) else weight
