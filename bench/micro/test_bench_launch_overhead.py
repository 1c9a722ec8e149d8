"""Host time per kernel call with the launch itself stubbed out: the Python the eager path (prefill, decode without
CUDA graphs) spends around each Triton launch: argument checks, config choice, allocations, grid. Triton's own
launcher is not in it. Runs anywhere (CPU tensors pick an H200's configs under simulated_device):

    pytest bench/micro/test_bench_launch_overhead.py --benchmark-only --benchmark-timer time.process_time

(process time: on a shared machine, wall time also counts the other processes' turns.) Issue 9's target:
<= 10 us per unchecked call. Each benchmark stores us_per_call in its extra_info.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.launches import placeholder_decode_inputs, placeholder_kv_caches, placeholder_model
from hayabusa.kernels._launch import H200, simulated_device
from hayabusa.kernels.decode_attention import decode_attention
from hayabusa.kernels.layernorm import layer_norm
from hayabusa.kernels.linear import linear, ln_linear
from hayabusa.kernels.rotary import rotary_tables

from devices import DEVICE, ON_GPU

HIDDEN, HEADS, HEAD_DIM, CONTEXT, PAGE, DTYPE = 2560, 32, 80, 2048, 16, torch.float16


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Every `kernel[grid](...)` only counts itself; on a CPU, launchers pick an H200's configs."""
    launches = []

    def stub(kernel, *args, grid, warmup, **kwargs):
        launches.append(kernel)

    monkeypatch.setattr(JITFunction, "run", stub)
    monkeypatch.setattr(InterpretedFunction, "run", stub)
    with contextlib.nullcontext() if ON_GPU else simulated_device(H200):
        yield launches


def per_call(benchmark, fn, calls_per_round: int = 1) -> None:
    """Time fn; store and print the median host time per kernel call (fn makes calls_per_round of them)."""
    benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    us = benchmark.stats.stats.median * 1e6 / calls_per_round
    benchmark.extra_info["us_per_call"] = us
    print(f"\n{benchmark.name}: {us:.1f} us per call")


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32).to(DEVICE, DTYPE)


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_overhead_linear_residual_m1(benchmark, stubbed_launches, checked):
    x, weight, h = randn(1, HIDDEN), randn(HIDDEN, HIDDEN), randn(1, HIDDEN)
    per_call(benchmark, lambda: linear(x, weight, residual=h, out=h, checked=checked))


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_overhead_ln_linear_m1(benchmark, stubbed_launches, checked):
    h, ln_w, ln_b, weight = randn(1, HIDDEN), randn(HIDDEN), randn(HIDDEN), randn(3 * HIDDEN, HIDDEN)
    per_call(benchmark, lambda: ln_linear(h, ln_w, ln_b, 1e-5, weight, checked=checked))


def test_overhead_ln_linear_prefill(benchmark, stubbed_launches):
    """M = 512: a LayerNorm launch, then the tile GEMM (two launches per call)."""
    h, ln_w, ln_b, weight = randn(512, HIDDEN), randn(HIDDEN), randn(HIDDEN), randn(3 * HIDDEN, HIDDEN)
    per_call(benchmark, lambda: ln_linear(h, ln_w, ln_b, 1e-5, weight, checked=False), 2)


def test_overhead_layer_norm(benchmark, stubbed_launches):
    x, weight, bias = randn(1, HIDDEN), randn(HIDDEN), randn(HIDDEN)
    out = torch.empty_like(x)
    per_call(benchmark, lambda: layer_norm(x, weight, bias, 1e-5, out=out))


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_overhead_decode_attention_b1(benchmark, stubbed_launches, checked):
    blocks = CONTEXT // PAGE
    qkv = randn(1, 3 * HIDDEN)
    k_cache, v_cache = randn(blocks, PAGE, HEADS, HEAD_DIM), randn(blocks, PAGE, HEADS, HEAD_DIM)
    positions = torch.tensor([CONTEXT - 1], dtype=torch.int32, device=DEVICE)
    block_tables = torch.arange(blocks, dtype=torch.int32, device=DEVICE)[None]
    cos, sin = rotary_tables(HEAD_DIM, CONTEXT, 10000.0, DEVICE)
    per_call(benchmark, lambda: decode_attention(
        qkv, positions, block_tables, k_cache, v_cache, cos, sin, HEAD_DIM, check_indices=False, checked=checked))


def test_overhead_decode_step_per_launch(benchmark, stubbed_launches):
    """PagedModel.decode of the 2.7B model at batch 1 (weights allocated, never written or read: launches are
    stubbed): host time per step over its launches, the embedding gather (torch) included."""
    model = placeholder_model(PRESETS["2.7b"], DTYPE, torch.device(DEVICE))
    blocks = CONTEXT // PAGE
    inputs, caches = placeholder_decode_inputs(1, blocks, model.device), placeholder_kv_caches(model, blocks)
    model.decode(inputs, caches)
    stubbed_launches.clear()
    model.decode(inputs, caches)
    launches_per_step = len(stubbed_launches) + 1
    per_call(benchmark, lambda: model.decode(inputs, caches), launches_per_step)
    benchmark.extra_info["launches_per_step"] = launches_per_step
