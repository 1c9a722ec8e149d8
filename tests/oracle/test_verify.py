"""`hayabusa verify` on a written random checkpoint: passes when the paths agree, fails when they do not."""

import argparse
import dataclasses

import pytest
import torch

from hayabusa.engine.core import paged_engine
from hayabusa.engine.loading.checkpoint_writer import write_random_checkpoint
from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.op_sets import OpSet
from hayabusa.engine.oracle import verify
from hayabusa.engine.platform import devices

ARGS = dict(dtype="float32", device="cpu", ops="torch", prompt=["人とAIが協調するためには、"], steps=4, revision=None,
            quantization=None, fp_model=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = PRESETS["tiny"].with_overrides(max_position_embeddings=64)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), config, dtype=torch.float32, seed=3)


def test_matching_paths_pass(model_dir, capsys) -> None:
    status = verify.run(argparse.Namespace(model=str(model_dir), **ARGS))
    report, progress = capsys.readouterr()
    assert status == 0, report
    assert "ok   layer 0 out" in report and "ok   final norm" in report and "ok   logits" in report
    assert "4/4 tokens identical" in report and "verify: passed" in report
    # Progress goes to stderr, stage by stage (before: nothing between the header and the end, 21 minutes on
    # `small` under the interpreter).
    assert "verify: prefill checks: 100%" in progress and "1/1 [" in progress
    assert "verify: greedy, reference: 100%" in progress and "4/4 [" in progress
    assert "verify: greedy, paged engine: " in progress
    assert "verify:" not in report.replace("hayabusa verify:", "").replace("verify: passed", "")


def with_wrong_layer_norm(ops: OpSet) -> OpSet:
    def layer_norm(x, weight, bias, eps, **kwargs):  # eps 1e-1 instead of 1e-5: a small but real error
        return ops.layer_norm(x, weight, bias, 1e-1, **kwargs)

    def ln_linear(x, ln_weight, ln_bias, eps, weight, **kwargs):  # the same error where the LayerNorm is fused
        return ops.ln_linear(x, ln_weight, ln_bias, 1e-1, weight, **kwargs)

    return dataclasses.replace(ops, layer_norm=layer_norm, ln_linear=ln_linear)


def test_a_wrong_kernel_fails_with_a_nonzero_status(model_dir, capsys, monkeypatch) -> None:
    load_ops = paged_engine.load_ops  # the engine's model serves both the prefill and the greedy checks
    monkeypatch.setattr(paged_engine, "load_ops", lambda name: with_wrong_layer_norm(load_ops(name)))
    status = verify.run(argparse.Namespace(model=str(model_dir), **ARGS))
    report = capsys.readouterr().out
    assert status == 1
    assert "ok   embedding" in report  # the embedding is no layer norm's business
    assert "FAIL layer 0 out" in report and "FAIL logits" in report and "verify: FAILED" in report


def test_too_many_steps_for_the_context_is_refused(model_dir) -> None:
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        verify.run(argparse.Namespace(model=str(model_dir), **{**ARGS, "steps": 60}))


def test_the_kernels_on_a_cpu_warn_that_the_interpreter_is_slow(model_dir, monkeypatch) -> None:
    class Stop(Exception):
        pass

    def engine_that_stops(*args, **kwargs):
        raise Stop  # the interpreted checks themselves take minutes; the warning comes before them

    monkeypatch.setattr(devices, "_interpreter_warned", False)
    monkeypatch.setattr(verify, "PagedEngine", engine_that_stops)
    with pytest.warns(devices.InterpreterWarning, match="--ops torch checks the engine without the kernels"), \
            pytest.raises(Stop):
        verify.run(argparse.Namespace(model=str(model_dir), **{**ARGS, "ops": "triton"}))


def test_a_model_quantized_while_loading_is_checked_and_its_drift_reported(model_dir, capsys) -> None:
    status = verify.run(argparse.Namespace(model=str(model_dir), **{**ARGS, "quantization": "int8"}))
    report = capsys.readouterr().out
    assert status == 0, report
    assert "quantized weights: W8A16_CHANNEL on 8 linear layers; the reference runs on them dequantized" in report
    assert "ok   logits" in report and "4/4 tokens identical" in report
    assert f"drift from the fp model {model_dir} (float32 references; figures, not checks):" in report
    drift = report[report.index("drift from the fp model"):]
    assert "max |err| / max |fp logit|" in drift and "prompt positions agree" in drift and "/4" in drift


def test_a_quantized_checkpoint_reports_drift_from_the_fp_model_it_names(model_dir, tmp_path, capsys) -> None:
    from hayabusa.engine.loading.quant_schemes import SCHEMES
    from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint

    quantized = quantize_checkpoint(model_dir, tmp_path / "int8", SCHEMES["W8A16_CHANNEL"], progress=False)
    assert verify.run(argparse.Namespace(model=str(quantized), **ARGS)) == 0
    assert "drift from the fp model: not measured (--fp-model DIR" in capsys.readouterr().out
    assert verify.run(argparse.Namespace(model=str(quantized), **{**ARGS, "fp_model": str(model_dir)})) == 0
    assert f"drift from the fp model {model_dir}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--fp-model measures a quantized model's drift, but .* is not quantized"):
        verify.run(argparse.Namespace(model=str(model_dir), **{**ARGS, "fp_model": str(model_dir)}))
