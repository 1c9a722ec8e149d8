"""The paged KV pool: one tensor [layers, 2, num_blocks, block_size, heads, head_dim] in the model dtype, whose
per-layer (k_cache, v_cache) views the model reads, so that a step's copy-on-write block copies (forked sequences)
are one batched index copy across every layer.

Its size is given (kv_cache_blocks) or taken from free memory (`blocks_that_fit`): on CUDA what is left after the
weights, minus room for the activations of the largest prefill; on a CPU half of the RAM available (MemAvailable in
/proc/meminfo, the same minus), capped at CPU_DEFAULT_SEQUENCES full-length sequences (CPU runs are tests, debugging
and small models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hayabusa.engine.loading.config import ModelConfig

CPU_DEFAULT_SEQUENCES = 4
CPU_KV_MEMORY_FRACTION = 0.5  # of the RAM available once the weights are loaded
ACTIVATION_HEADROOM_BYTES = 256 << 20  # allocator slack, CUDA-graph pool, cuBLAS/Triton workspaces


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, k and v."""
    return 2 * config.num_hidden_layers * block_size * config.hidden_size * dtype.itemsize


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def blocks_that_fit(config: ModelConfig, dtype: torch.dtype, device: torch.device, *, block_size: int,
                    max_num_seqs: int, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
    """How many KV blocks the pool takes on `device` (see the module docstring); ValueError when not even one
    full-length sequence fits."""
    max_blocks_per_seq = -(-config.max_position_embeddings // block_size)
    block_bytes = kv_block_bytes(config, block_size, dtype)
    itemsize = dtype.itemsize
    # Largest prefill: qkv (3H) + attention (H) + hidden (H) + normed (H) + MLP intermediate (4H) per token,
    # plus the logits of a full decode batch in the model dtype and in fp32 with sampling's sort buffers.
    activations = max_num_batched_tokens * (6 * config.hidden_size + config.intermediate_size) * itemsize
    activations += max_num_seqs * config.vocab_size * (itemsize + 4 + 4 + 8)
    if device.type != "cuda":
        full = CPU_DEFAULT_SEQUENCES * max_blocks_per_seq
        available = available_host_memory()
        if available is None:
            return full
        budget = int(available * CPU_KV_MEMORY_FRACTION) - activations
        if budget < block_bytes:
            raise ValueError(f"only {available / 2**30:.2f} GiB of RAM is available: too little for a KV cache "
                             f"block of {block_bytes / 2**20:.1f} MiB beside the activations; pass kv_cache_blocks")
        return int(min(full, budget // block_bytes))
    free, total = torch.cuda.mem_get_info(device)
    budget = free - int(total * (1 - gpu_memory_utilization)) - activations - ACTIVATION_HEADROOM_BYTES
    num_blocks = budget // block_bytes
    if num_blocks < max_blocks_per_seq:
        raise ValueError(
            f"only {max(budget, 0) / 2**30:.2f} GiB of {device} memory is left for the KV cache "
            f"({free / 2**30:.2f} GiB free): {max(num_blocks, 0)} blocks of {block_bytes / 2**20:.1f} MiB, fewer "
            f"than one {config.max_position_embeddings}-token sequence needs ({max_blocks_per_seq}); "
            f"free GPU memory, raise gpu_memory_utilization or pass kv_cache_blocks"
        )
    return int(num_blocks)


def kv_pool(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pool, zeroed, not empty: a kernel's masked tile never sees stale NaN bit patterns."""
    shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_attention_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
