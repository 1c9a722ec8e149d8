"""What the engine launches on a GPU, found on any machine: PagedModel's forward passes run on meta tensors under a
simulated device (an H200 by default), every launch recorded instead of executed (kernels/launch_count.py).

- `decode_step_launches`: one decode step's launches, per layer and outside the layers, Triton and torch.
- `engine_specializations`: every distinct compiled kernel (kernel, constexprs, warps, stages) the engine can
  launch for a model, dtype, device and batch limits. Linear configs are fixed per M bucket, decode attention's
  split count is a power of two and token counts are never specialized on, so the set is small; warm start
  compiles it ahead and `bench/sm90_compile_check.py` checks it for register spills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.quant_schemes import WeightScheme
from hayabusa.engine.loading.tensor_names import (
    EMBED_IN,
    EMBED_OUT,
    LinearWeight,
    expected_shapes,
    layer_linear_weights,
)
from hayabusa.engine.model.op_sets import load_ops
from hayabusa.engine.model.paged_model import DecodeInputs, KVCaches, PagedModel, PrefillInputs
from hayabusa.kernels._launch import H200, DeviceLimits, cdiv, engine_tickets, simulated_device, ticket_capacity
from hayabusa.kernels.launch_count import LaunchLog, RecordedLaunch, recorded_launches
from hayabusa.kernels.linear import M_BUCKETS
from hayabusa.kernels.quantized_weight import QuantizedWeight, code_columns

META = torch.device("meta")
BLOCK_SIZE = 16  # the engine's default KV-cache page


def placeholder_model(config: ModelConfig, dtype: torch.dtype, device: torch.device = META,
                      scheme: WeightScheme | None = None) -> PagedModel:
    """PagedModel on the Triton op set with weights that are never written: on the meta device (the default: no
    memory, nothing can run) or allocated uninitialized on `device`, for recording or stubbing launches. `scheme`:
    every layer's Linear weights quantized in it (as --quantization loads them)."""
    state: dict[str, LinearWeight] = {name: torch.empty(shape, dtype=dtype, device=device)
                                      for name, shape in expected_shapes(config).items()}
    if config.tie_word_embeddings:
        state[EMBED_OUT] = state[EMBED_IN]
    if scheme is not None:
        for name in layer_linear_weights(config):
            state[name] = placeholder_quantized_weight(state[name].shape, scheme, dtype, device)
    return PagedModel(config, state, load_ops("triton"))


def placeholder_quantized_weight(shape: tuple[int, int], scheme: WeightScheme, dtype: torch.dtype,
                                 device: torch.device) -> QuantizedWeight:
    """An unwritten QuantizedWeight of dense shape (N, K) in `scheme`, scales in `dtype`."""
    N, K = shape
    groups = 1 if scheme.group_size is None else K // scheme.group_size
    zeros = None if scheme.symmetric else torch.empty(N, groups, dtype=torch.uint8, device=device)
    return QuantizedWeight(torch.empty(N, code_columns(scheme.bits, K), dtype=torch.uint8, device=device),
                           torch.empty(N, groups, dtype=dtype, device=device), zeros, scheme.bits, scheme.group_size, K)


def placeholder_kv_caches(model: PagedModel, num_blocks: int) -> KVCaches:
    """Per layer (k_cache, v_cache) [num_blocks, BLOCK_SIZE, heads, head_dim] on the model's device, unwritten."""
    cfg = model.config
    shape = (num_blocks, BLOCK_SIZE, cfg.num_attention_heads, cfg.head_dim)
    return [(torch.empty(shape, dtype=model.dtype, device=model.device),) * 2 for _ in range(cfg.num_hidden_layers)]


def placeholder_decode_inputs(batch: int, blocks_per_seq: int, device: torch.device = META) -> DecodeInputs:
    """A decode step's inputs, unwritten, as the runner builds them (indices valid by construction)."""
    return DecodeInputs(input_ids=torch.zeros(batch, dtype=torch.int64, device=device),
                        positions=torch.empty(batch, dtype=torch.int32, device=device),
                        block_tables=torch.empty(batch, blocks_per_seq, dtype=torch.int32, device=device),
                        check_indices=False)


def placeholder_tickets(config: ModelConfig, max_num_seqs: int) -> torch.Tensor:
    """An engine's split-reduction ticket counters (ModelRunner's size), on the meta device."""
    capacity = ticket_capacity(max(3 * config.hidden_size, config.intermediate_size, config.vocab_size),
                               max_num_seqs, config.num_attention_heads)
    return torch.empty(capacity, dtype=torch.int32, device=META)


def _record_decode(model: PagedModel, batch: int, blocks_per_seq: int) -> LaunchLog:
    """The launches of one decode step of `batch` sequences whose block tables hold blocks_per_seq entries, with an
    engine's ticket counters (a split launch needing more than the engine holds fails here)."""
    inputs = placeholder_decode_inputs(batch, blocks_per_seq)
    kv_caches = placeholder_kv_caches(model, batch * blocks_per_seq)
    with engine_tickets(placeholder_tickets(model.config, batch)), recorded_launches() as log:
        model.decode(inputs, kv_caches)
    return log


def _record_prefill(model: PagedModel, num_tokens: int) -> LaunchLog:
    """The launches of one prefill of num_tokens new tokens, in sequences of at most the model's positions."""
    max_len = model.config.max_position_embeddings
    num_seqs = cdiv(num_tokens, max_len)
    blocks_per_seq = cdiv(min(num_tokens, max_len), BLOCK_SIZE)
    inputs = PrefillInputs(input_ids=torch.empty(num_tokens, dtype=torch.int64, device=META),
                           positions=torch.empty(num_tokens, dtype=torch.int32, device=META),
                           cu_seqlens=torch.empty(num_seqs + 1, dtype=torch.int32, device=META),
                           context_lens=torch.empty(num_seqs, dtype=torch.int32, device=META),
                           block_tables=torch.empty(num_seqs, blocks_per_seq, dtype=torch.int32, device=META),
                           last_token_rows=torch.empty(num_seqs, dtype=torch.int64, device=META),
                           max_seqlen_q=min(num_tokens, max_len), check_indices=False)
    with engine_tickets(placeholder_tickets(model.config, num_seqs)), recorded_launches() as log:
        model.prefill(inputs, placeholder_kv_caches(model, num_seqs * blocks_per_seq))
    return log


@dataclass(frozen=True)
class StepLaunchCount:
    """Device kernel launches of one decode step (CUDA-graph block tables: full width, so the longest contexts)."""

    batch: int
    num_layers: int
    per_layer: int  # Triton launches in every layer
    outside_layers: int  # Triton launches before and after the layers (the LM head)
    torch_ops: tuple[str, ...]  # torch operators that launch a device kernel (the embedding gather)
    kernels_per_layer: tuple[str, ...]  # the Triton kernels of one layer, in launch order

    @property
    def triton(self) -> int:
        return self.num_layers * self.per_layer + self.outside_layers

    @property
    def total(self) -> int:
        return self.triton + len(self.torch_ops)

    def as_dict(self) -> dict:
        return {"batch": self.batch, "total": self.total, "triton": self.triton, "per_layer": self.per_layer,
                "outside_layers_triton": self.outside_layers, "torch_ops": list(self.torch_ops),
                "kernels_per_layer": list(self.kernels_per_layer)}


def decode_step_launches(config: ModelConfig, batch: int = 1, *, dtype: torch.dtype = torch.float16,
                         limits: DeviceLimits = H200, scheme: WeightScheme | None = None) -> StepLaunchCount:
    """Count one decode step's launches with `limits`' configs (`scheme`: on weights quantized in it); per layer from
    one more layer's difference."""
    logs = []
    for num_layers in (config.num_hidden_layers, config.num_hidden_layers + 1):
        model = placeholder_model(config.with_overrides(num_hidden_layers=num_layers), dtype, scheme=scheme)
        blocks_per_seq = cdiv(config.max_position_embeddings, BLOCK_SIZE)
        with simulated_device(limits):
            logs.append(_record_decode(model, batch, blocks_per_seq))
    base, extended = logs
    per_layer = len(extended.triton) - len(base.triton)
    first_layer = base.triton[:per_layer]  # no Triton launch precedes the first layer (the embedding is torch)
    return StepLaunchCount(batch, config.num_hidden_layers, per_layer,
                           len(base.triton) - config.num_hidden_layers * per_layer, tuple(base.torch_ops),
                           tuple(launch.name for launch in first_layer))


@dataclass(frozen=True)
class Specialization:
    kernel: str
    config: tuple[tuple[str, str], ...]  # constexprs, num_warps and num_stages: (name, value) sorted by name
    example: str = field(compare=False)  # the first forward pass seen launching it, e.g. "decode batch 1"
    launch: RecordedLaunch = field(compare=False, repr=False)  # its recorded launch, to compile it from


def bucket_representatives(limit: int) -> list[int]:
    """One row count per linear-config bucket up to `limit` (batch sizes or token counts), `limit` included."""
    return sorted({m for m in M_BUCKETS if m < limit} | {limit})


def engine_specializations(config: ModelConfig, dtype: torch.dtype, *, limits: DeviceLimits = H200,
                           max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                           token_counts: list[int] | None = None) -> list[Specialization]:
    """Every kernel specialization the engine can launch: decode at every batch bucket up to max_num_seqs and
    every block-table width that changes decode attention's split count, and prefill at every token-count bucket
    up to max_num_batched_tokens (or at `token_counts` only)."""
    model = placeholder_model(config.with_overrides(num_hidden_layers=min(2, config.num_hidden_layers)), dtype)
    max_blocks = cdiv(config.max_position_embeddings, BLOCK_SIZE)
    batches = bucket_representatives(max_num_seqs)
    widths = sorted({1 << i for i in range(max_blocks.bit_length()) if 1 << i < max_blocks} | {max_blocks})
    token_counts = token_counts or bucket_representatives(max_num_batched_tokens)
    found: dict[Specialization, None] = {}
    with simulated_device(limits):
        runs = [(f"decode batch {b} blocks {w}", _record_decode(model, b, w)) for b in batches for w in widths]
        runs += [(f"prefill {t} tokens", _record_prefill(model, t)) for t in token_counts]
    for example, log in runs:
        for launch in log.triton:
            found.setdefault(Specialization(launch.name, launch.config, example, launch))
    return list(found)
