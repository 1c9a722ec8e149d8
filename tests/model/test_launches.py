"""Launches per decode step and the kernel specializations the engine can launch, at the 2.7B shapes with an H200's
launch configs (PagedModel on meta tensors, every launch recorded instead of run: no GPU, no arithmetic)."""

import dataclasses
import importlib

import pytest
import torch

from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.model.launches import (
    decode_step_launches,
    engine_specializations,
    placeholder_decode_inputs,
    placeholder_kv_caches,
    placeholder_model,
)
from hayabusa.engine.sample.sampler import SamplerMode, row_mode
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.worker.model_runner import ModelRunner
from hayabusa.kernels._launch import H200, INTERPRETER, simulated_device
from hayabusa.kernels.launch_count import recorded_launches

CONFIG = PRESETS["2.7b"]
GEMV, ATTENTION = "_gemv_kernel", "_decode_attention_kernel"
QUANTIZED_GEMV = "_gemv_quantized_kernel"


def test_decode_step_at_batch_1_fits_the_launch_budget():
    count = decode_step_launches(CONFIG, batch=1)
    # ln_linear(qkv), attention (split merge inside), dense + residual, ln_linear(fc1, GELU), fc2 + residual
    assert count.kernels_per_layer == (GEMV, ATTENTION, GEMV, GEMV, GEMV)
    assert count.outside_layers == 1  # the LM head, final LayerNorm fused
    assert count.torch_ops == ("aten.embedding.default",)
    assert count.total == 32 * 5 + 1 + 1 == 162  # the 164 leaves the sampler 2


@pytest.mark.parametrize("batch,per_layer", [(2, 5), (4, 5), (8, 7), (256, 7)])
def test_larger_batches_add_only_separate_layer_norms(batch, per_layer):
    count = decode_step_launches(CONFIG, batch=batch)
    assert count.per_layer == per_layer
    assert count.kernels_per_layer.count(ATTENTION) == 1  # never a separate merge or split-K reduce kernel
    assert set(count.kernels_per_layer) <= {GEMV, ATTENTION, "_linear_kernel", "_layer_norm_kernel"}


def test_specializations_are_few_and_fixed_within_a_bucket():
    specializations = engine_specializations(CONFIG, torch.float16, max_num_seqs=256, max_num_batched_tokens=8192)
    assert len(specializations) <= 50
    assert {s.kernel for s in specializations if s.kernel == ATTENTION} and all(
        dict(s.config)["NUM_SPLITS"] in {"1", "2", "4", "8", "16"} for s in specializations if s.kernel == ATTENTION)
    # token counts inside one bucket (one sequence each: the LM head's rows stay 1) launch exactly the same kernels
    for low, high in ((5, 16), (65, 256), (300, 2048)):
        assert engine_specializations(CONFIG, torch.float16, token_counts=[low], max_num_seqs=1) == \
            engine_specializations(CONFIG, torch.float16, token_counts=[high], max_num_seqs=1)


@pytest.mark.parametrize("module,kernel,argument", [
    ("gemv", "_gemv_kernel", "M"), ("linear", "_linear_kernel", "M"),
    ("decode_attention", "_decode_attention_kernel", "block_table_row_stride"),
    ("prefill_attention", "_write_kv_kernel", "block_table_stride"),
    ("prefill_attention", "_prefill_attention_kernel", "block_table_stride")])
def test_token_counts_and_table_widths_never_pick_a_compiled_variant(module, kernel, argument):
    """Triton would otherwise compile a variant per value class (== 1, % 16 == 0): a JIT stall while serving."""
    jitted = getattr(importlib.import_module(f"hayabusa.kernels.{module}"), kernel)
    # a JITFunction holds the names itself, the interpreter's wrapper in the kwargs it was made with
    unspecialized = getattr(jitted, "do_not_specialize", None) or jitted.kwargs["do_not_specialize"]
    assert argument in unspecialized


def record_decode_step(mode: SamplerMode, batch: int = 1, scheme=None):
    """The launches of the runner's decode step as a CUDA graph holds it: the block-table scatter, the model (its
    layers' Linear weights quantized in `scheme`), the sampler in `mode`."""
    runner = ModelRunner(placeholder_model(CONFIG, torch.float16, scheme=scheme), block_size=16, num_kv_blocks=128,
                         max_num_seqs=8, max_num_batched_tokens=512, use_cuda_graphs=False)
    views = runner._decode_layout(batch).device
    with simulated_device(H200), runner.on_device(), recorded_launches() as log:
        runner._decode_body(batch, mode, views)
    return log


def test_the_whole_decode_step_with_greedy_sampling_fits_164():
    log = record_decode_step(SamplerMode.GREEDY)
    assert log.torch_ops == ["aten.index_copy_.default", "aten.embedding.default", "aten.max.dim_max"]
    assert len(log.triton) == 32 * 5 + 1
    assert len(log.triton) + len(log.torch_ops) == 164


@pytest.mark.parametrize("name", SCHEMES)
def test_a_quantized_greedy_decode_step_fits_164_too(name):
    """int8 / int4 weights: the dequantization is inside each linear's launch, so the step launches what it does
    on fp16 weights, one quantized GEMV per linear (the LM head stays fp16)."""
    log = record_decode_step(SamplerMode.GREEDY, scheme=SCHEMES[name])
    assert log.torch_ops == ["aten.index_copy_.default", "aten.embedding.default", "aten.max.dim_max"]
    assert [launch.name for launch in log.triton[:5]] == [QUANTIZED_GEMV, ATTENTION] + [QUANTIZED_GEMV] * 3
    assert [launch.name for launch in log.triton[-1:]] == [GEMV]
    assert len(log.triton) + len(log.torch_ops) == 164


def test_openai_options_at_their_defaults_keep_the_greedy_and_sampling_steps():
    """Clients fill presence_penalty=0, frequency_penalty=0, logit_bias={} and best_of=1 in by default: such a request
    samples in the mode it would without them, whose step launches what it did before these options existed (the
    counts below); the OpenAI processors run in the PROCESS step only."""
    defaults = dict(presence_penalty=0, frequency_penalty=0.0, logit_bias={}, best_of=1)
    assert row_mode(SamplingParams(**defaults)) is SamplerMode.GREEDY
    assert row_mode(SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, **defaults)) is SamplerMode.SAMPLE
    for option in ({"presence_penalty": 0.5}, {"frequency_penalty": -1.0}, {"logit_bias": {7: -100.0}}):
        assert row_mode(SamplingParams(**option)) is SamplerMode.PROCESS, option
    logs = {mode: record_decode_step(mode) for mode in SamplerMode}
    assert len(logs[SamplerMode.GREEDY].torch_ops) == 3
    assert len(logs[SamplerMode.SAMPLE].torch_ops) == 100  # the sampling step's launches before the options
    assert {len(log.triton) for log in logs.values()} == {32 * 5 + 1}
    scatter_add = "aten.scatter_add_.default"  # the generated-token counts of the frequency and presence penalties
    assert scatter_add in logs[SamplerMode.PROCESS].torch_ops and scatter_add not in logs[SamplerMode.SAMPLE].torch_ops


def decode_step_kwargs(limits) -> list[dict]:
    model = placeholder_model(CONFIG.with_overrides(num_hidden_layers=1), torch.float16)
    with simulated_device(limits), recorded_launches() as log:
        model.decode(placeholder_decode_inputs(1, 128, torch.device("meta")), placeholder_kv_caches(model, 128))
    return [launch.kwargs for launch in log.triton]


def test_programmatic_dependent_launch_where_the_device_and_triton_have_it(monkeypatch):
    """Every decode-step kernel waits for the previous one and is launched with launch_pdl on an sm_90 device with a
    Triton that has both (>= 3.4); on an older Triton, an older device or under the interpreter, neither."""
    import hayabusa.kernels._launch as launch_helpers

    kwargs = decode_step_kwargs(H200)
    if launch_helpers.TRITON_HAS_PDL:
        assert all(k["PDL"] is True and k["launch_pdl"] is True for k in kwargs)
    sm80 = dataclasses.replace(H200, programmatic_launch=False)
    monkeypatch.setattr(launch_helpers, "TRITON_HAS_PDL", False)
    for limits in (H200, sm80, INTERPRETER):
        assert all(k["PDL"] is False and "launch_pdl" not in k for k in decode_step_kwargs(limits))
