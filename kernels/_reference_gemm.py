"""The GEMM behind `linear_ref`: act(x @ weight.T + bias) + residual, accumulated in fp32 and rounded to x's dtype
once, as the Triton kernel computes it, without the textbook form's costs on a CPU.

The textbook form, x.float() @ weight.float().T, copies the whole weight to fp32 on every call in fp16/bf16 (a
2.7B decode step would move 5x the weight bytes) and runs the epilogue as separate passes. Here:
- CPU, when oneDNN computes the dtype (fp32 on any x86 torch build; fp16/bf16 where oneDNN has the instructions,
  e.g. avx512-bf16 / AMX): one fused oneDNN inner product. Its bias, GELU and residual add run on the fp32
  accumulator before the single rounding. On a 2-core EPYC, for the 2.7B model's weights, it matches MKL's fp32
  result bit for bit and runs 1.3-1.5x faster at 4-16 rows (MKL's small-M path there is compute-bound), equal at
  1 row; on small weights its ~15 us per call costs more than it saves, so fp32 takes it only from
  ONEDNN_MIN_FP32_WEIGHT elements and ONEDNN_MIN_FP32_K columns on (half dtypes always: it is their fast path).
- CPU fp16/bf16 otherwise: the weight is upcast WEIGHT_BLOCK_BYTES at a time into one reused fp32 block that stays
  in cache, so memory sees the half-width weight once; the epilogue runs in fp32.
- other devices: the textbook form.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_BLOCK_BYTES = 4 << 20  # fp32 bytes of weight rows upcast at once: within a core's share of L3
ONEDNN_MIN_FP32_WEIGHT = 1 << 22  # 2.7B's smallest weight (2560 x 2560) is 6.6M elements; tiny's LM head 5.1M...
ONEDNN_MIN_FP32_K = 512  # ...but with K = 160, where MKL is faster at 4 rows
_PROBE_SHAPE = (3, 40, 24)  # rows, K, N of the start-up check of oneDNN's fused product


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                     activation: str | None) -> Tensor:
    """act(x @ weight.T + bias) + residual: [M, N] in x's dtype (arguments already validated)."""
    if _takes_onednn(x, weight) and not (activation and residual is not None):
        return onednn_linear(x, weight, bias, residual, activation)
    y = _fp32_product(x, weight)  # fp32 [M, N], a fresh tensor: the epilogue works in place
    if bias is not None:
        y += bias
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y += residual
    return y.to(x.dtype)


def _takes_onednn(x: Tensor, weight: Tensor) -> bool:
    return x.device.type == "cpu" and x.shape[0] > 0 and onednn_takes(weight)


def onednn_takes(weight: Tensor) -> bool:
    """Whether oneDNN's fused product is this CPU weight's fast path (its dtype's, and big enough to gain)."""
    if weight.device.type != "cpu" or not onednn_fuses(weight.dtype):
        return False
    return weight.dtype != torch.float32 or (weight.numel() >= ONEDNN_MIN_FP32_WEIGHT
                                             and weight.shape[1] >= ONEDNN_MIN_FP32_K)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                   activation: str | None) -> Tensor:
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if activation == "gelu":  # algorithm "none": the exact erf form
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fp32_product(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T in fp32: [M, N]."""
    x32 = x.float()
    if weight.dtype == torch.float32 or weight.device.type != "cpu":
        return x32 @ weight.float().T
    num_rows, k = weight.shape
    block_rows = max(1, WEIGHT_BLOCK_BYTES // (4 * k))
    block = torch.empty(min(block_rows, num_rows), k, dtype=torch.float32)  # reused: stays in cache
    y = torch.empty(x.shape[0], num_rows, dtype=torch.float32)
    for start in range(0, num_rows, block_rows):
        rows = block[:min(block_rows, num_rows - start)].copy_(weight[start:start + block_rows])
        y[:, start:start + rows.shape[0]] = x32 @ rows.T
    return y


@functools.cache
def onednn_fuses(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN runs the fused product in `dtype`: checked once against the fp32 form, so a
    build or CPU without it (e.g. bf16 without avx512-bf16) takes the other path instead of failing."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    rows, k, n = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, residual = (torch.randn(shape, generator=generator).to(dtype)
                                 for shape in ((rows, k), (n, k), (n,), (rows, n)))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    try:
        for activation, res in ((None, None), ("gelu", None), (None, residual)):
            got = onednn_linear(x, weight, bias, res, activation).float()
            want = x.float() @ weight.float().T + bias.float()
            want = F.gelu(want) if activation else want
            want = want + res.float() if res is not None else want
            if got.shape != want.shape or not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
                return False
    except RuntimeError:
        return False
    return True
