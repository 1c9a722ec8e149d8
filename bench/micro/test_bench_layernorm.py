"""Microbenchmark: `layer_norm` (the LayerNorm launch before a tile GEMM) vs torch's F.layer_norm at the model's width.

GPU only: `pytest bench/micro/test_bench_layernorm.py --benchmark-only -s`. Figures are the median of
`triton.testing.do_bench` (CUDA events, L2 flushed between calls), printed and stored in each benchmark's
extra_info with the achieved bandwidth next to the device-to-device copy bandwidth measured in the same session.
"""

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels.layernorm import layer_norm

from devices import ON_GPU
from gpu_bench import report

DTYPE = torch.float16
HIDDEN = 2560
EPS = 1e-5
ROWS = [1, 32, 256, 2048, 8192]

pytestmark = pytest.mark.skipif(not ON_GPU, reason="kernel microbenchmarks need a CUDA GPU")


def make_inputs(M: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(M, HIDDEN, device="cuda", dtype=DTYPE), torch.randn(HIDDEN, device="cuda", dtype=DTYPE),
            torch.randn(HIDDEN, device="cuda", dtype=DTYPE))


@pytest.mark.parametrize("M", ROWS)
def test_bench_layer_norm(benchmark, M):
    x, weight, bias = make_inputs(M)
    out = torch.empty_like(x)
    report(benchmark, f"layer_norm M={M} N={HIDDEN}", lambda: layer_norm(x, weight, bias, EPS, out=out),
           lambda: F.layer_norm(x, (HIDDEN,), weight, bias, EPS), (2 * M * HIDDEN + 2 * HIDDEN) * DTYPE.itemsize)
