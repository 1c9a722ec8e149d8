"""Split reductions inside one launch (GEMV tiles shared by programs, tile GEMM split-K, decode attention splits):
bit-identical run to run, and an engine's ticket counters are all zero again after every launch (so the next launch or
CUDA-graph replay starts clean); a launch needing more counters than the engine holds is refused."""

import pytest
import torch

from hayabusa.kernels._launch import engine_tickets, ticket_capacity, ticket_counters
from hayabusa.kernels.decode_attention import decode_attention
from hayabusa.kernels.gemv import GemvConfig, launch_gemv
from hayabusa.kernels.linear import GemmConfig, launch_linear
from hayabusa.kernels.rotary import rotary_tables

from devices import DEVICE
from tolerance import Guarded

COUNTERS = 64


def twice(run, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two runs on one set of engine counters: they must be all zero after each."""
    counters = Guarded((COUNTERS,), torch.int32, DEVICE, fill=0)
    outputs = []
    with engine_tickets(counters.tensor):
        for _ in range(2):
            out = Guarded(shape, dtype, DEVICE)
            run(out.tensor)
            out.check()
            assert not counters.tensor.any()
            outputs.append(out.tensor)
    counters.check("ticket counters")
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

    def run(out):
        k_cache, v_cache = Guarded(cache_shape, torch.float32, DEVICE), Guarded(cache_shape, torch.float32, DEVICE)
        k_cache.tensor.copy_(keys)
        v_cache.tensor.copy_(values)
        out.copy_(decode_attention(qkv, positions, block_tables, k_cache.tensor, v_cache.tensor, cos, sin, 16,
                                   num_splits=4))
        k_cache.check("k_cache")
        v_cache.check("v_cache")

    first, second = twice(run, (3, heads * head_dim), torch.float32)
    assert torch.equal(first, second) and not first.isnan().any()


def test_a_launch_needing_more_counters_than_the_engine_holds_is_refused():
    x, weight = torch.randn(1, 64).to(DEVICE), torch.randn(40, 64).to(DEVICE)
    with engine_tickets(torch.zeros(2, dtype=torch.int32, device=DEVICE)):  # the launch has 3 tiles
        with pytest.raises(ValueError, match="needs 3 ticket counters on .*; the engine's hold 2"):
            launch_gemv(GemvConfig(1, 16, 16, 5, 16), x, weight, None, None, None, Guarded((1, 40), torch.float32,
                                                                                              DEVICE).tensor)


def test_outside_an_engine_each_split_launch_gets_its_own_zeroed_counters():
    first, second = ticket_counters(torch.device(DEVICE), 5), ticket_counters(torch.device(DEVICE), 5)
    assert first.data_ptr() != second.data_ptr() and not first.any() and first.numel() == 5


def test_ticket_capacity_bounds_linear_tiles_and_attention_programs():
    # 2.7B: 16 row tiles x cdiv(32000, 16) column tiles for a split linear at up to 256 rows; 256 x 32 attention
    assert ticket_capacity(32000, 256, 32) == 16 * 2000
    assert ticket_capacity(64, 1024, 32) == 1024 * 32
