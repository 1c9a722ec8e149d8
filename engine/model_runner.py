"""Runs FastModel on scheduled sequences: owns the paged KV pool, packs inputs, replays decode CUDA graphs.

KV pool: per layer a (k_cache, v_cache) pair [num_blocks, block_size, heads, head_dim] in the model dtype. Its
size is given (`num_kv_blocks`) or, on CUDA, taken from the free memory left after the weights, minus room for
the activations of the largest prefill batch. On a CPU without a given size it holds CPU_DEFAULT_SEQUENCES
full-length sequences (CPU runs are tests and debugging).

CUDA graphs: on a CUDA device the decode step is captured once per batch size in GRAPH_BATCH_SIZES (up to
max_num_seqs); a batch of n sequences replays the smallest graph of at least n rows, the extra rows padded with
position -1, which the decode kernel skips (no cache write, zero output).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from hayabusa.engine.block_manager import PagedSequence
from hayabusa.engine.config import ModelConfig
from hayabusa.engine.fast_model import DecodeInputs, FastModel, PrefillInputs
from hayabusa.engine.sequence import Sequence

CPU_DEFAULT_SEQUENCES = 4
GRAPH_SMALL_BATCH_SIZES = (1, 2, 4, 8)
GRAPH_BATCH_STEP = 16  # beyond 8: 16, 32, 48, ... up to max_num_seqs
ACTIVATION_HEADROOM_BYTES = 256 << 20  # allocator slack, CUDA-graph pool, cuBLAS/Triton workspaces


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, k and v."""
    return 2 * config.num_hidden_layers * block_size * config.hidden_size * dtype.itemsize


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in GRAPH_SMALL_BATCH_SIZES if b < max_num_seqs]
    sizes += list(range(GRAPH_BATCH_STEP, max_num_seqs, GRAPH_BATCH_STEP))
    return sorted(set(sizes + [max_num_seqs]))


class ModelRunner:
    def __init__(self, model: FastModel, *, block_size: int, num_kv_blocks: int | None, max_num_seqs: int,
                 max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9,
                 use_cuda_graphs: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if num_kv_blocks is not None and (not isinstance(num_kv_blocks, int) or num_kv_blocks < 1):
            raise ValueError(f"kv_cache_blocks must be a positive integer or None, got {num_kv_blocks!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.model = model
        self.config = model.config
        self.device = model.device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-self.config.max_position_embeddings // block_size)
        if num_kv_blocks is None:
            num_kv_blocks = self._blocks_that_fit(max_num_batched_tokens, gpu_memory_utilization)
        self.num_kv_blocks = num_kv_blocks
        shape = (num_kv_blocks, block_size, self.config.num_attention_heads, self.config.head_dim)
        # Zeroed, not empty: a kernel's masked tile never sees stale NaN bit patterns.
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=self.device),
                           torch.zeros(shape, dtype=model.dtype, device=self.device))
                          for _ in range(self.config.num_hidden_layers)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if use_cuda_graphs and self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self._capture_decode_graphs()

    def _blocks_that_fit(self, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
        block_bytes = kv_block_bytes(self.config, self.block_size, self.model.dtype)
        if self.device.type != "cuda":
            return CPU_DEFAULT_SEQUENCES * self.max_blocks_per_seq
        free, total = torch.cuda.mem_get_info(self.device)
        cfg, itemsize = self.config, self.model.dtype.itemsize
        # Largest prefill: qkv (3H) + attention (H) + hidden (H) + normed (H) + MLP intermediate (4H) per token,
        # plus the logits of a full decode batch in the model dtype and in fp32 with sampling's sort buffers.
        activations = max_num_batched_tokens * (6 * cfg.hidden_size + cfg.intermediate_size) * itemsize
        activations += self.max_num_seqs * cfg.vocab_size * (itemsize + 4 + 4 + 8)
        budget = free - int(total * (1 - gpu_memory_utilization)) - activations - ACTIVATION_HEADROOM_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"only {max(budget, 0) / 2**30:.2f} GiB of {self.device} memory is left for the KV cache "
                f"({free / 2**30:.2f} GiB free): {max(num_blocks, 0)} blocks of {block_bytes / 2**20:.1f} MiB, fewer "
                f"than one {self.config.max_position_embeddings}-token sequence needs ({self.max_blocks_per_seq}); "
                f"free GPU memory, raise gpu_memory_utilization or pass kv_cache_blocks"
            )
        return int(num_blocks)

    # ---- input packing ---------------------------------------------------------------------------------------

    def _to_device(self, values: list[int] | list[list[int]], dtype: torch.dtype) -> Tensor:
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _block_tables(self, seqs: list[PagedSequence], width: int) -> Tensor:
        """int32 [len(seqs), width]; unused entries -1."""
        return self._to_device([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs],
                               torch.int32)

    def prepare_prefill(self, seqs: list[PagedSequence]) -> PrefillInputs:
        """Pack every sequence's tokens past its prefix-cache hit; the cached prefix is read from the pool.

        seqs need block tables from this pool's BlockManager (`hayabusa verify` packs its prompts here too).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        cu_seqlens = [0]
        for seq in seqs:
            input_ids += seq.token_ids[seq.num_cached_tokens:]
            positions += range(seq.num_cached_tokens, len(seq.token_ids))
            cu_seqlens.append(len(input_ids))
        return PrefillInputs(
            input_ids=self._to_device(input_ids, torch.int64),
            positions=self._to_device(positions, torch.int32),
            cu_seqlens=self._to_device(cu_seqlens, torch.int32),
            context_lens=self._to_device([len(seq.token_ids) for seq in seqs], torch.int32),
            block_tables=self._block_tables(seqs, max(len(seq.block_table) for seq in seqs)),
            last_token_rows=self._to_device([end - 1 for end in cu_seqlens[1:]], torch.int64),
            max_seqlen_q=max(len(seq.token_ids) - seq.num_cached_tokens for seq in seqs),
            check_indices=False,  # block ids come from the pool, lengths are capped at max_position_embeddings
        )

    def prepare_decode(self, seqs: list[Sequence]) -> DecodeInputs:
        """One token per sequence: its last (sampled, not yet cached) token at position len - 1."""
        return DecodeInputs(
            input_ids=self._to_device([seq.token_ids[-1] for seq in seqs], torch.int64),
            positions=self._to_device([len(seq) - 1 for seq in seqs], torch.int32),
            block_tables=self._block_tables(seqs, max(len(seq.block_table) for seq in seqs)),
            check_indices=False,
        )

    # ---- running ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> Tensor:
        """Logits for the next token of each sequence: float32 [len(seqs), vocab]."""
        # Steps may run on any caller's thread, and a thread's current CUDA device is its own.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._run(seqs, is_prefill)

    def _run(self, seqs: list[Sequence], is_prefill: bool) -> Tensor:
        if is_prefill:
            return self.model.prefill(self.prepare_prefill(seqs), self.kv_caches).float()
        inputs = self.prepare_decode(seqs)
        graph_size = next((b for b in self.graphs if b >= len(seqs)), None)
        if graph_size is None:
            return self.model.decode(inputs, self.kv_caches).float()
        return self._replay(graph_size, inputs)

    def _replay(self, graph_size: int, inputs: DecodeInputs) -> Tensor:
        n, width = inputs.block_tables.shape
        static = self.graph_inputs
        static.input_ids[:n].copy_(inputs.input_ids)
        static.positions[:n].copy_(inputs.positions)
        static.positions[n:graph_size].fill_(-1)  # padding rows: nothing written, output ignored
        static.block_tables[:n, :width].copy_(inputs.block_tables)
        graph, logits = self.graphs[graph_size]
        graph.replay()
        return logits[:n].float()

    @torch.no_grad()
    def _capture_decode_graphs(self) -> None:
        """One graph per batch size, largest first so the smaller ones reuse its memory pool."""
        max_bs = self.max_num_seqs
        self.graph_inputs = DecodeInputs(
            input_ids=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            positions=torch.full((max_bs,), -1, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device),
            check_indices=False,  # a capture reads nothing back anyway; the warm-up runs need not either
        )
        pool = None
        for bs in reversed(graph_batch_sizes(max_bs)):
            inputs = DecodeInputs(self.graph_inputs.input_ids[:bs], self.graph_inputs.positions[:bs],
                                  self.graph_inputs.block_tables[:bs], check_indices=False)
            self.model.decode(inputs, self.kv_caches)  # warm-up: compiles the kernels for this shape outside capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.decode(inputs, self.kv_caches)  # [bs, vocab]
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))  # ascending, so a decode step takes the first that fits
        torch.cuda.synchronize(self.device)
