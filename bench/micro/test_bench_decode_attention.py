"""Decode attention at the 2.7B model's shapes: Triton kernel vs a PyTorch equivalent, in achieved GB/s (GPU only).

Run: `pytest bench/micro/test_bench_decode_attention.py --benchmark-only -s`. Each line printed gives the median
time (CUDA events, triton.testing.do_bench), the bytes one call must move (the K/V of every attended position,
the qkv row in, the new K/V and the output out) per second, and that rate as a fraction of this device's
measured copy bandwidth (the HBM ceiling a bandwidth-bound kernel can reach). Both forms are timed as CUDA-graph
replays, as the engine runs decode: no Python or launch overhead, and no argument checks (they read device
memory, so decode_attention skips them while a graph is being captured).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels.decode_attention import decode_attention
from hayabusa.kernels.rotary import apply_rotary_ref, rotary_tables

from devices import ON_GPU
from gpu_bench import copy_bytes_per_s, time_synced

pytestmark = pytest.mark.skipif(not ON_GPU, reason="decode attention is benchmarked on a GPU only")

NUM_HEADS, HEAD_DIM, CONTEXT, BLOCK_SIZE, DTYPE = 32, 80, 2048, 16, torch.float16


def torch_decode_attention(qkv, positions, block_tables, k_cache, v_cache, cos, sin, rotary_dims):
    """The obvious PyTorch form: rotary, index_put into the cache, gather every page, masked SDPA."""
    batch, (_, block_size, num_heads, head_dim) = qkv.shape[0], k_cache.shape
    q, k, v = qkv.view(batch, num_heads, 3, head_dim).unbind(2)  # each [B, H, D]
    cos_p, sin_p = cos[positions][:, None], sin[positions][:, None]  # [B, 1, r/2]
    q, k = apply_rotary_ref(q, cos_p, sin_p), apply_rotary_ref(k, cos_p, sin_p)
    pages = block_tables.long()
    slots = pages.gather(1, (positions // block_size)[:, None].long())[:, 0] * block_size + positions % block_size
    k_cache.view(-1, num_heads, head_dim)[slots] = k
    v_cache.view(-1, num_heads, head_dim)[slots] = v
    keys = k_cache[pages].flatten(1, 2).transpose(1, 2)  # [B, H, max_blocks * block_size, D]
    values = v_cache[pages].flatten(1, 2).transpose(1, 2)
    attended = torch.arange(keys.shape[2], device=qkv.device)[None, :] <= positions[:, None]  # [B, T]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=attended[:, None, None])
    return out.reshape(batch, num_heads * head_dim)


def make_inputs(batch: int) -> tuple:
    """Every sequence decodes its last position (CONTEXT keys) on pages at random block ids."""
    device = "cuda"
    blocks_per_seq = CONTEXT // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(batch, 3 * NUM_HEADS * HEAD_DIM, device=device, dtype=DTYPE)
    positions = torch.full((batch,), CONTEXT - 1, dtype=torch.int32, device=device)
    cos, sin = rotary_tables(HEAD_DIM, CONTEXT, 10000.0, device)
    return qkv, positions, block_tables, k_cache, v_cache, cos, sin, HEAD_DIM


def bytes_moved(batch: int) -> int:
    kv_read = batch * (CONTEXT - 1) * 2 * NUM_HEADS * HEAD_DIM  # cached K and V of every earlier position
    qkv_in = batch * 3 * NUM_HEADS * HEAD_DIM
    kv_written_and_out = batch * 3 * NUM_HEADS * HEAD_DIM  # new K, new V, output row
    return (kv_read + qkv_in + kv_written_and_out) * DTYPE.itemsize


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_bench_decode_attention(benchmark, batch, impl):
    from triton.testing import do_bench

    args = make_inputs(batch)
    op = decode_attention if impl == "triton" else torch_decode_attention
    # Both forms must compute the same thing before their speeds are compared (this also compiles the kernels).
    torch.testing.assert_close(decode_attention(*args), torch_decode_attention(*args), atol=2e-3, rtol=1e-2)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(*args)
    median_ms = do_bench(graph.replay, return_mode="median")
    gbs = bytes_moved(batch) / (median_ms * 1e-3) / 1e9
    ceiling = copy_bytes_per_s() / 1e9
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), median_ms=median_ms, achieved_gbs=gbs,
                                copy_bandwidth_gbs=ceiling, fraction_of_copy_bandwidth=gbs / ceiling)
    print(f"\ndecode_attention {impl:6s} batch {batch:2d} ctx {CONTEXT} heads {NUM_HEADS} head_dim {HEAD_DIM} "
          f"{DTYPE}: {median_ms * 1e3:8.1f} us  {gbs:7.0f} GB/s  = {gbs / ceiling:5.1%} of copy {ceiling:.0f} GB/s")
    time_synced(benchmark, graph.replay)
