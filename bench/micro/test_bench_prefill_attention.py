"""Prefill attention at the 2.7B model's shapes: Triton kernel vs PyTorch SDPA, in achieved TFLOP/s (GPU only).

Run: `pytest bench/micro/test_bench_prefill_attention.py --benchmark-only -s`. Each line printed gives the median
time (CUDA events, triton.testing.do_bench), the attention FLOPs per second — 4 * heads * head_dim per visible
(query, key) pair: q @ k^T and p @ v, causal pairs only — and that rate as a fraction of this device's measured
dense fp16 matmul rate. Forms timed:
  - triton: `prefill_attention` (cache write of the new k/v, then paged attention with in-kernel rotary);
    its index checks run once per set of index tensors (once per step in the engine), so the timed calls are
    the two kernel launches;
  - torch: the obvious PyTorch equivalent — rotary, index_put into the paged cache, causal SDPA over the new
    tokens (no cached prefix, so SDPA may run its flash kernel on contiguous q/k/v);
  - sdpa: causal SDPA alone on ready, rotated [1, heads, tokens, head_dim] tensors: the attention floor torch has.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels.prefill_attention import prefill_attention
from hayabusa.kernels.rotary import apply_rotary_ref, rotary_tables

from devices import ON_GPU
from gpu_bench import matmul_flops_per_s, time_synced

pytestmark = pytest.mark.skipif(not ON_GPU, reason="prefill attention is benchmarked on a GPU only")

NUM_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 80, 16, torch.float16


def make_inputs(seq_lens: list[int]) -> tuple:
    """Fresh prompts (no cached prefix) packed back to back, pages at random block ids."""
    device = "cuda"
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks)
    block_ids = torch.randperm(num_blocks, device=device).int()
    block_tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    start = 0
    for seq, count in enumerate(blocks):
        block_tables[seq, :count] = block_ids[start:start + count]
        start += count
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    qkv = torch.randn(sum(seq_lens), 3 * NUM_HEADS * HEAD_DIM, device=device, dtype=DTYPE)
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens]).int()
    cu_seqlens = torch.tensor([0] + seq_lens, device=device).cumsum(0).int()
    context_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    cos, sin = rotary_tables(HEAD_DIM, 2048, 10000.0, device)
    return qkv, positions, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin, HEAD_DIM


def torch_prefill_attention(qkv, positions, cu_seqlens, context_lens, block_tables, k_cache, v_cache, cos, sin,
                            rotary_dims):
    """Rotary, cache write, causal SDPA per sequence (fresh prompts: the new tokens are the whole context)."""
    num_tokens, (_, block_size, num_heads, head_dim) = qkv.shape[0], k_cache.shape
    q, k, v = qkv.view(num_tokens, num_heads, 3, head_dim).unbind(2)  # each [T, H, D]
    cos_p, sin_p = cos[positions][:, None], sin[positions][:, None]
    q, k = apply_rotary_ref(q, cos_p, sin_p), apply_rotary_ref(k, cos_p, sin_p)
    seq_of_token = torch.repeat_interleave(torch.arange(len(context_lens), device=qkv.device),
                                           cu_seqlens.diff(), output_size=num_tokens)
    slots = block_tables[seq_of_token, positions // block_size].long() * block_size + positions % block_size
    k_cache.view(-1, num_heads, head_dim)[slots] = k
    v_cache.view(-1, num_heads, head_dim)[slots] = v
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        per_head = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
        outputs.append(F.scaled_dot_product_attention(*per_head, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outputs).reshape(num_tokens, num_heads * head_dim)


def causal_flops(seq_lens: list[int]) -> int:
    pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    return 4 * NUM_HEADS * HEAD_DIM * pairs


@pytest.mark.parametrize("impl", ["triton", "torch", "sdpa"])
@pytest.mark.parametrize("seq_lens", [[2048], [512] * 4, [1024, 512, 300, 212]], ids=["1x2048", "4x512", "mixed"])
def test_bench_prefill_attention(benchmark, seq_lens, impl):
    from triton.testing import do_bench

    args = make_inputs(seq_lens)
    # Both forms must compute the same thing before their speeds are compared (this also compiles the kernels).
    torch.testing.assert_close(prefill_attention(*args), torch_prefill_attention(*args), atol=2e-3, rtol=1e-2)
    if impl == "triton":
        def op():
            return prefill_attention(*args)
    elif impl == "torch":
        def op():
            return torch_prefill_attention(*args)
    else:
        if len(seq_lens) > 1:
            pytest.skip("sdpa alone is timed on the single-sequence shape")
        q, k, v = args[0].view(-1, NUM_HEADS, 3, HEAD_DIM).unbind(2)
        q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))

        def op():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    median_ms = do_bench(op, return_mode="median")
    tflops = causal_flops(seq_lens) / (median_ms * 1e-3) / 1e12
    ceiling = matmul_flops_per_s(DTYPE) / 1e12
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), median_ms=median_ms, tflops=tflops,
                                matmul_tflops=ceiling, fraction_of_matmul=tflops / ceiling)
    print(f"\nprefill_attention {impl:6s} seqs {'+'.join(map(str, seq_lens)):>16s} heads {NUM_HEADS} head_dim "
          f"{HEAD_DIM} {DTYPE}: {median_ms * 1e3:8.1f} us  {tflops:6.1f} TFLOP/s = {tflops / ceiling:5.1%} of "
          f"matmul {ceiling:.0f} TFLOP/s")
    time_synced(benchmark, op)
