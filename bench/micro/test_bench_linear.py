"""Microbenchmark: epilogue-fused `linear` and `fused_mlp` vs cuBLAS matmul + separate GELU / bias / residual ops.

GPU only: `pytest bench/micro/test_bench_linear.py --benchmark-only -s`. The figures are the median of
`triton.testing.do_bench` (CUDA events, L2 flushed between calls, so weights come from HBM), printed and stored in
each benchmark's extra_info next to the device ceilings measured in the same session (device-to-device copy
bandwidth, cuBLAS square-matmul rate). pytest-benchmark's own column also counts launch + synchronize per call.
"""

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels.linear import linear
from hayabusa.kernels.mlp import fused_mlp

from devices import ON_GPU
from gpu_bench import report

DTYPE = torch.float16
HIDDEN, INTER = 2560, 10240
BATCHES = [1, 32, 256, 2048]
# The model's projections: name -> (N, K, bias, activation, residual)
PROJECTIONS = {
    "query_key_value": (3 * HIDDEN, HIDDEN, False, None, False),
    "dense+bias+residual": (HIDDEN, HIDDEN, True, None, True),
    "dense_h_to_4h+gelu": (INTER, HIDDEN, False, "gelu", False),
    "dense_4h_to_h+residual": (HIDDEN, INTER, False, None, True),
}

pytestmark = pytest.mark.skipif(not ON_GPU, reason="kernel microbenchmarks need a CUDA GPU")


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("M", BATCHES)
def test_bench_linear(benchmark, M, projection):
    N, K, has_bias, activation, has_residual = PROJECTIONS[projection]
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    weight = torch.randn(N, K, device="cuda", dtype=DTYPE) / K**0.5
    bias = torch.randn(N, device="cuda", dtype=DTYPE) if has_bias else None
    residual = torch.randn(M, N, device="cuda", dtype=DTYPE) if has_residual else None
    out = torch.empty(M, N, device="cuda", dtype=DTYPE)

    def kernel():
        linear(x, weight, bias=bias, residual=residual, activation=activation, out=out)

    def baseline():  # what the unfused model does: matmul, then each epilogue op as its own kernel
        y = F.linear(x, weight, bias)
        if activation == "gelu":
            y = F.gelu(y)
        if residual is not None:
            y = y + residual
        return y

    elem = DTYPE.itemsize
    num_bytes = (N * K + M * K + M * N * (2 if has_residual else 1) + (N if has_bias else 0)) * elem
    report(benchmark, f"linear {projection} M={M} N={N} K={K}", kernel, baseline, num_bytes, 2 * M * N * K,
           dtype=DTYPE)


@pytest.mark.parametrize("M", BATCHES)
def test_bench_fused_mlp(benchmark, M):
    x = torch.randn(M, HIDDEN, device="cuda", dtype=DTYPE)
    ln_weight = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    ln_bias = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    w_in = torch.randn(INTER, HIDDEN, device="cuda", dtype=DTYPE) / HIDDEN**0.5
    w_out = torch.randn(HIDDEN, INTER, device="cuda", dtype=DTYPE) / INTER**0.5
    out = torch.empty_like(x)

    def kernel():
        fused_mlp(x, ln_weight, ln_bias, 1e-5, w_in, w_out, out=out)

    def baseline():
        return x + F.gelu(F.layer_norm(x, (HIDDEN,), ln_weight, ln_bias, 1e-5) @ w_in.T) @ w_out.T

    elem = DTYPE.itemsize
    # weights once, x in (twice: normalized and as the residual), the activated intermediate written and read back,
    # the output out
    num_bytes = (2 * INTER * HIDDEN + 3 * M * HIDDEN + 2 * M * INTER) * elem
    report(benchmark, f"fused_mlp M={M} hidden={HIDDEN} inter={INTER}", kernel, baseline, num_bytes,
           4 * M * HIDDEN * INTER, dtype=DTYPE)
