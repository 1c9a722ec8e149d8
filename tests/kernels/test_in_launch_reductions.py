"""Split reductions inside one launch (linear split-K, decode attention splits): bit-identical run to run, and the
ticket counters are all zero again after every launch (so the next launch or CUDA-graph replay starts clean)."""

import pytest
import torch

from hayabusa.kernels._launch import ticket_counters
from hayabusa.kernels.decode_attention import decode_attention
from hayabusa.kernels.gemv import GemvConfig, launch_gemv
from hayabusa.kernels.linear import GemmConfig, launch_linear
from hayabusa.kernels.rotary import rotary_tables

from devices import DEVICE
from tolerance import Guarded


def tickets_are_zero() -> bool:
    return not ticket_counters(torch.device(DEVICE), 1).any()


def twice(run, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = []
    for _ in range(2):
        out = Guarded(shape, dtype, DEVICE)
        run(out.tensor)
        out.check()
        assert tickets_are_zero()
        outputs.append(out.tensor)
    return outputs[0], outputs[1]


@pytest.mark.parametrize("kernel", ["gemv", "tile"])
def test_linear_split_k_is_bit_identical(kernel):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 300, generator=gen).to(DEVICE), torch.randn(29, 300, generator=gen).to(DEVICE)
    bias = torch.randn(29, generator=gen).to(DEVICE)
    if kernel == "gemv":
        def run(out):
            launch_gemv(GemvConfig(4, 8, 64, 3, 8), x, weight, bias, None, "gelu", out)
    else:
        def run(out):
            launch_linear(GemmConfig(16, 16, 32, 4, 1, 4, 2), x, weight, bias, None, "gelu", out)
    first, second = twice(run, (3, 29), torch.float32)
    assert torch.equal(first, second) and not first.isnan().any()


def test_decode_attention_splits_are_bit_identical():
    gen = torch.Generator().manual_seed(1)
    heads, head_dim, page, num_blocks = 2, 24, 16, 16
    cache_shape = (num_blocks, page, heads, head_dim)
    keys, values = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen)
    block_tables = torch.randperm(num_blocks, generator=gen)[:15].view(3, 5).int().to(DEVICE)
    qkv = torch.randn(3, 3 * heads * head_dim, generator=gen).to(DEVICE)
    cos, sin = rotary_tables(16, 128, 10000.0, DEVICE)
    positions = torch.tensor([70, 5, 33], dtype=torch.int32, device=DEVICE)
    outputs = []
    for _ in range(2):
        k_cache, v_cache = Guarded(cache_shape, torch.float32, DEVICE), Guarded(cache_shape, torch.float32, DEVICE)
        k_cache.tensor.copy_(keys)
        v_cache.tensor.copy_(values)
        outputs.append(decode_attention(qkv, positions, block_tables, k_cache.tensor, v_cache.tensor, cos, sin, 16,
                                        num_splits=4))
        k_cache.check("k_cache")
        v_cache.check("v_cache")
        assert tickets_are_zero()
    assert torch.equal(outputs[0], outputs[1]) and not outputs[0].isnan().any()
