"""The pieces of the one-command GPU run that a CPU can check: sizes, targets, the per-kernel table's arithmetic,
the cold/warm start probe, and that GPU-only measurements are skipped here with their reason."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hayabusa.bench import report, suite
from hayabusa.bench.kernel_profile import decode_step_kernels, kernel_summary, kernel_timeline
from hayabusa.bench.records import BenchRecord
from hayabusa.bench.roofline import DeviceRoofline
from hayabusa.bench.runners import EngineUnavailable, HayabusaRunner
from hayabusa.bench.targets import evaluate_targets
from hayabusa.bench.workloads import SIZES, check_sizes_fit, longest_sequence, workload_kv_blocks
from hayabusa.engine.loading.config import PRESETS

GPU = SIZES["gpu"]


def test_gpu_sizes_are_issue_9s_cases_and_fit_the_27b_model():
    check_sizes_fit(GPU, PRESETS["2.7b"].max_position_embeddings)
    assert GPU.decode_batches == (1, 8, 64) and GPU.decode_prompt_len == 128 and GPU.prefill_prompt_lens == (2048,)
    assert GPU.long_decode_prompt_len + GPU.decode_gen_len == 2048
    settings = suite.SuiteSettings(model="2.7b", model_dir=Path("."), preset="2.7b", config=PRESETS["2.7b"],
                                   device=torch.device("cpu"), dtype=torch.float16, sizes=GPU,
                                   scenarios=("load", "decode", "prefill"), engines=(), engines_requested=False)
    roofline = DeviceRoofline("cpu", "float16", 1e9, 1e12, 1, 1)
    labels = [label for _, label, _ in suite.generation_cases(settings, roofline)]
    assert labels == ["load", "decode batch 1", "decode batch 8", "decode batch 64", "decode batch 1 prompt 1920",
                      "prefill prompt 2048"]
    assert suite.decode_cases(GPU) == [(1, 128), (8, 128), (64, 128), (1, 1920)]


def test_cpu_kv_pool_holds_the_static_batch_of_the_longest_sequence():
    smoke = SIZES["smoke"]
    assert longest_sequence(smoke) == 33  # prefill 32 + the sampled token
    assert workload_kv_blocks(smoke) == smoke.static_batch * 3  # 33 tokens: 3 blocks of 16


def _record(engine, scenario, case, **figures):
    fields = dict(batch=1, prompt_len=128, gen_len=128, ms_per_token=None, ms=None, tokens_per_s=None,
                  pct_roofline=None) | figures
    return BenchRecord(engine, scenario, case, fields["batch"], fields["prompt_len"], fields["gen_len"],
                       fields["ms_per_token"], fields["ms"], fields["tokens_per_s"], fields["pct_roofline"], None, 1,
                       [1.0], None).as_dict()


def test_targets_are_judged_only_from_a_gpu_run():
    records = [_record("hayabusa", "decode", "batch1", ms_per_token=1.4, pct_roofline=85.0),
               _record("transformers-compile", "decode", "batch1", ms_per_token=2.0),
               _record("transformers-eager", "decode", "batch1", ms_per_token=9.0),
               _record("hayabusa", "decode", "batch64", tokens_per_s=30_000.0),
               _record("transformers-eager", "decode", "batch64", tokens_per_s=1_000.0),
               _record("hayabusa", "prefill", "prompt2048", ms=25.0)]
    rows = {r["target"]: r for r in evaluate_targets({"device_type": "cuda", "records": records})}
    assert [r["met"] for r in rows.values()] == [True, True, False, True, True, False]
    assert rows["decode, batch 1: >= 6x transformers eager"]["measured"] == pytest.approx(9.0 / 1.4)
    on_cpu = evaluate_targets({"device_type": "cpu", "records": records})
    assert all(r["met"] is None and r["measured"] is None for r in on_cpu)


def _event(name, start, end, device=True):
    device_type = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end))


def test_kernel_timeline_orders_kernels_and_measures_the_gaps_between_them():
    events = [_event("gemv", 10.0, 14.0), _event("cudaLaunchKernel", 0.0, 30.0, device=False),
              _event("attention", 15.5, 17.0), _event("gemv", 20.0, 26.0)]
    timeline = kernel_timeline(events)
    assert [(k["name"], k["us"], k["gap_before_us"]) for k in timeline["kernels"]] == [
        ("gemv", 4.0, 0.0), ("attention", 1.5, 1.5), ("gemv", 6.0, 3.0)]
    totals = timeline["step_us"], timeline["kernel_us"], timeline["gap_us"], timeline["launches"]
    assert totals == (16.0, 11.5, 4.5, 3)
    summary = kernel_summary(timeline["kernels"])
    assert [(r["name"], r["calls"], r["total_us"], r["mean_us"]) for r in summary] == [
        ("gemv", 2, 10.0, 5.0), ("attention", 1, 1.5, 1.5)]
    text = "\n".join(report._kernel_section([{"batch": 1, "prompt_len": 128, **timeline}]))
    assert "| 1 | 128 | 16.0 | 11.5 | 4.5 | 3 |" in text and "| `gemv` | 2 | 10.0 | 5.0 | 3.0 |" in text


def test_the_kernel_table_is_skipped_off_a_gpu():
    runner = HayabusaRunner("hayabusa", "triton", Path("."), torch.float16, torch.device("cpu"), static_batch=None)
    with pytest.raises(EngineUnavailable, match="CUDA only"):
        decode_step_kernels(runner, batch=1, prompt_len=16)

