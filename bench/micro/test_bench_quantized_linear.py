"""Microbenchmark: `linear` / `ln_linear` on int8 and int4 weights (QuantizedWeight, issue 18's presets) vs cuBLAS on
the dequantized fp16 weight with separate epilogue ops, at the 2.7B model's projections.

GPU only: `pytest bench/micro/test_bench_quantized_linear.py --benchmark-only -s`. Figures as in
test_bench_linear.py (gpu_bench.report: median of triton.testing.do_bench with L2 flushed), except that the bytes
behind "GB/s" are the weight's own: codes + scales + zero codes, the stream a decode step is bound by.
"""

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels.compressed_tensors_format import quantize_rtn
from hayabusa.kernels.linear import linear, ln_linear
from hayabusa.kernels.quantized_weight import dequantize_ref

from devices import ON_GPU
from gpu_bench import report

DTYPE = torch.float16
HIDDEN, INTER = 2560, 10240
BATCHES = [1, 4, 32, 2048]
# issue 18's presets: name -> (bits, group_size, symmetric)
SCHEMES = {"W8A16": (8, 128, True), "int8-channel": (8, None, True), "W4A16": (4, 128, True),
           "W4A16_ASYM": (4, 128, False)}
# The model's projections: name -> (N, K, LayerNorm fused, bias, activation, residual)
PROJECTIONS = {
    "ln+query_key_value": (3 * HIDDEN, HIDDEN, True, False, None, False),
    "dense+bias+residual": (HIDDEN, HIDDEN, False, True, None, True),
    "ln+dense_h_to_4h+gelu": (INTER, HIDDEN, True, False, "gelu", False),
    "dense_4h_to_h+residual": (HIDDEN, INTER, False, False, None, True),
}

pytestmark = pytest.mark.skipif(not ON_GPU, reason="kernel microbenchmarks need a CUDA GPU")


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("M", BATCHES)
def test_bench_quantized_linear(benchmark, M, projection, scheme):
    N, K, has_ln, has_bias, activation, has_residual = PROJECTIONS[projection]
    weight = quantize_rtn(torch.randn(N, K, device="cuda", dtype=DTYPE) / K**0.5, *SCHEMES[scheme])
    dense = dequantize_ref(weight)  # the baseline's fp16 weight
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    ln_weight, ln_bias = torch.randn(K, device="cuda", dtype=DTYPE), torch.randn(K, device="cuda", dtype=DTYPE)
    bias = torch.randn(N, device="cuda", dtype=DTYPE) if has_bias else None
    residual = torch.randn(M, N, device="cuda", dtype=DTYPE) if has_residual else None
    out = torch.empty(M, N, device="cuda", dtype=DTYPE)
    epilogue = dict(bias=bias, residual=residual, activation=activation, out=out)

    def kernel():
        if has_ln:
            ln_linear(x, ln_weight, ln_bias, 1e-5, weight, **epilogue)
        else:
            linear(x, weight, **epilogue)

    def baseline():  # the unfused fp16 model: LayerNorm, matmul, then each epilogue op as its own kernel
        y = F.linear(F.layer_norm(x, (K,), ln_weight, ln_bias, 1e-5) if has_ln else x, dense, bias)
        if activation == "gelu":
            y = F.gelu(y)
        return y + residual if residual is not None else y

    report(benchmark, f"{scheme} {projection} M={M} N={N} K={K} ({weight.nbytes / 2**20:.1f} MiB of weight)",
           kernel, baseline, weight.nbytes, 2 * M * N * K, dtype=DTYPE)
