"""Roofline: what the model must move and compute per step, and what this device can move and compute.

Decode is bound by memory: every step reads all weights once plus each sequence's KV cache, so its floor is
`bytes_per_decode_step / copy_bandwidth`; at batch 1 the weights alone over the read bandwidth (a reduction over a
buffer: weights are only read) is the floor a CPU engine is held to. Weights count in the format the engine streams
(WEIGHT_FORMAT_BYTES: a quantized engine reads fewer bytes, so its floor is lower). Prefill is bound by matmul
rate: its floor is `flops / matmul_rate`.
Both device figures are measured in the same run (not taken from a spec sheet), in the run's dtype and with its
torch threads, so "% of roofline" compares the engine with what this device actually sustains. Each is the fastest
of its timed calls: another process or a scheduler hiccup can only slow a call down, and a limit measured low
would put an engine above 100% of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from hayabusa.bench.timing import time_ms
from hayabusa.engine.loading.config import ModelConfig

PEAK_TIMED_RUNS = 10
# Bytes per weight an engine streams, by format: int8 per output channel (a scale per row: negligible); int4 in
# groups of 128 with a 16-bit scale and a 4-bit zero point per group.
WEIGHT_FORMAT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2.5 / 128}
DENSE_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def layer_weight_params(config: ModelConfig) -> int:
    """Parameters of one layer: qkv [3h, h], dense [h, h], mlp [4h, h] + [h, 4h], two LayerNorms (w + b)."""
    h, inter = config.hidden_size, config.intermediate_size
    return 3 * h * h + h * h + 2 * h * inter + 4 * h


def decode_weight_bytes(config: ModelConfig, batch: int, bytes_per_param: float) -> float:
    """Weight bytes one decode step reads: all layers, final LN, the whole LM head and `batch` embedding rows."""
    h, vocab = config.hidden_size, config.vocab_size
    params = (config.num_hidden_layers * layer_weight_params(config)
              + h  # dense_bias of the last layer
              + 2 * h  # final LayerNorm
              + vocab * h  # embed_out: every logit needs its whole row
              + batch * h)  # embed_in: only the rows of this step's tokens
    return params * bytes_per_param


def kv_bytes_per_position(config: ModelConfig, bytes_per_value: int) -> int:
    """K and V of one token over all layers: 2 * layers * hidden values."""
    return 2 * config.num_hidden_layers * config.hidden_size * bytes_per_value


def decode_kv_bytes(config: ModelConfig, context_lens: Sequence[int], bytes_per_value: int) -> int:
    """KV bytes one decode step reads (every attended position, the new one included) and writes (one each)."""
    per_position = kv_bytes_per_position(config, bytes_per_value)
    return per_position * (sum(context_lens) + len(context_lens))


def decode_step_bytes(config: ModelConfig, context_lens: Sequence[int], bytes_per_value: int,
                      weight_bytes: int | None = None) -> int:
    """Bytes one batched decode step must move: weights once + each sequence's KV cache. weight_bytes: the
    weights' bytes per step in the format the engine holds them (quantized: codes, scales and zero points);
    default: every parameter in the KV cache's dtype."""
    if weight_bytes is None:
        weight_bytes = decode_weight_bytes(config, len(context_lens), bytes_per_value)
    return weight_bytes + decode_kv_bytes(config, context_lens, bytes_per_value)


def mean_decode_step_bytes(config: ModelConfig, batch: int, prompt_len: int, gen_len: int, bytes_per_value: int,
                           weight_bytes: int | None = None) -> float:
    """Mean bytes per step over the gen_len - 1 decode steps after the first token of a forced-length run.

    Decode step j (1 .. gen_len - 1) feeds the token at position prompt_len + j - 1, which attends to
    prompt_len + j - 1 cached positions.
    """
    if gen_len < 2:
        raise ValueError(f"gen_len must be >= 2 to have a decode step, got {gen_len}")
    steps = [decode_step_bytes(config, [prompt_len + j - 1] * batch, bytes_per_value, weight_bytes)
             for j in range(1, gen_len)]
    return sum(steps) / len(steps)


def prefill_flops(config: ModelConfig, batch: int, prompt_len: int) -> int:
    """Matmul FLOPs of a prefill (2 per multiply-add): projections on every token, causal attention, and the
    LM head on the last token only (the only logits a generation needs)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    tokens = batch * prompt_len
    projections = 2 * tokens * layers * (3 * h * h + h * h + 2 * h * config.intermediate_size)
    # QK^T and PV: query t attends t keys; sum_t t = T (T + 1) / 2 per sequence, h multiply-adds each.
    attention = 2 * 2 * layers * h * batch * prompt_len * (prompt_len + 1) // 2
    lm_head = 2 * batch * h * config.vocab_size
    return projections + attention + lm_head


@dataclass(frozen=True)
class DeviceRoofline:
    """Measured device limits: bytes/s of a device-to-device copy, FLOP/s of a large square matmul and bytes/s
    read by a reduction over a buffer of copy_bytes (None where not measured)."""

    device: str
    dtype: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int  # size of the copied buffer
    matmul_size: int  # n of the n x n x n matmul
    timed_runs: int = PEAK_TIMED_RUNS  # each rate is the fastest of this many
    read_bytes_per_s: float | None = None

    def decode_floor_ms(self, step_bytes: float) -> float:
        return step_bytes / self.copy_bytes_per_s * 1e3

    def read_floor_ms(self, read_bytes: float) -> float | None:
        return None if self.read_bytes_per_s is None else read_bytes / self.read_bytes_per_s * 1e3

    def prefill_floor_ms(self, flops: float) -> float:
        return flops / self.matmul_flops_per_s * 1e3

    def as_dict(self) -> dict:
        read = None if self.read_bytes_per_s is None else self.read_bytes_per_s / 1e9
        return {**asdict(self), "copy_gb_per_s": self.copy_bytes_per_s / 1e9,
                "matmul_tflops": self.matmul_flops_per_s / 1e12, "read_gb_per_s": read}


def pct_of_floor(floor_ms: float, measured_ms: float) -> float:
    """100 means the engine ran at the device limit; lower is further from it."""
    if measured_ms <= 0:
        raise ValueError(f"measured time must be > 0 ms, got {measured_ms}")
    return 100.0 * floor_ms / measured_ms


def measure_copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = PEAK_TIMED_RUNS) -> float:
    """Bytes/s of the fastest dst.copy_(src): each copy reads and writes num_bytes."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * num_bytes / (min(timing.samples_ms) / 1e3)


def measure_read_bandwidth(device: torch.device, num_bytes: int, repeats: int = PEAK_TIMED_RUNS) -> float:
    """Bytes/s of the fastest max over a float32 buffer of num_bytes: a vectorized read of every byte."""
    src = torch.randn(num_bytes // 4, device=device)
    timing = time_ms(lambda: src.amax(), device, repeats=repeats, warmup=2)
    return src.nbytes / (min(timing.samples_ms) / 1e3)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = PEAK_TIMED_RUNS) -> float:
    """FLOP/s of the fastest n x n @ n x n matmul in `dtype` (2 n^3 FLOPs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timing = time_ms(lambda: torch.matmul(a, b, out=out), device, repeats=repeats, warmup=2)
    return 2 * size**3 / (min(timing.samples_ms) / 1e3)


def measure_roofline(device: torch.device, dtype: torch.dtype, copy_bytes: int, matmul_size: int) -> DeviceRoofline:
    return DeviceRoofline(
        device=str(device), dtype=str(dtype).removeprefix("torch."),
        copy_bytes_per_s=measure_copy_bandwidth(device, copy_bytes),
        matmul_flops_per_s=measure_matmul_rate(device, dtype, matmul_size),
        copy_bytes=copy_bytes, matmul_size=matmul_size, read_bytes_per_s=measure_read_bandwidth(device, copy_bytes),
    )

