"""The decode step fills the chip at batch 1-4 (issue 19): every weight-streaming kernel of the 2.7B step, compiled
for sm_90 without a GPU, holds >= 2 CTAs per SM with no spills and runs a whole number of waves (or >= 4) of equal
shares; its PTX waits for the previous kernel (programmatic dependent launch) where Triton has it. So do the linear
layers on int8 / int4 weights. And a GPU run's per-kernel profile is printed beside the predictions."""

import json
import os
import subprocess
import sys

import pytest

from hayabusa.bench.decode_occupancy import compare, format_comparison, load_profiles
from hayabusa.bench.kernel_profile import WARM_STEPS
from hayabusa.bench.report import _predicted_section
from hayabusa.bench.sm90_compile_check import SKIP_EXIT_CODE, cuda_compiler_missing
from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.decode_occupancy import H100, H200, decode_step_table
from hayabusa.kernels._launch import TRITON_HAS_PDL

GRID_DEPENDENCY = ["griddepcontrol.launch_dependents", "griddepcontrol.wait"]


def test_every_weight_streaming_kernel_at_batch_1_to_4_fills_the_chip(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "hayabusa.bench.decode_occupancy", "--batches", "1", "2", "3", "4",
                          "--quantized", "--json", str(tmp_path / "table.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    print(run.stdout)  # the tables, shown with -s or on failure
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("no sm_90 compile here"):
        pytest.skip(run.stdout.splitlines()[0])
    tables = json.loads((tmp_path / "table.json").read_text())["tables"]
    steps = [t for t in tables if t["title"] == "decode step"]
    assert [t["batch"] for t in steps] == [1, 2, 3, 4] and len(tables) == 4 + 4 * 4  # + 4 quantized schemes
    for table in tables:
        assert table["launches"] == (164 if table in steps else 4 * 32)
        streaming = [row for row in table["rows"] if row["kernel"] in ("_gemv_kernel", "_gemv_quantized_kernel")]
        assert [row["role"] for row in streaming] == ["qkv", "attention out", "mlp in", "mlp out"] + (
            ["lm head"] if table in steps else [])
        for row in streaming:
            where = (table["batch"], row["role"], row["registers"], row["resident"], row["waves"])
            assert row["spill_bytes"] == 0 and row["resident"] >= 2 and row["fills_the_chip"], where
        for row in table["rows"]:
            assert row["spill_bytes"] == 0, (table["batch"], row["role"])
            if TRITON_HAS_PDL:
                assert row["grid_dependency"] == GRID_DEPENDENCY, (table["batch"], row["role"])
    assert "MISS" not in run.stdout


def test_where_triton_cannot_compile_for_cuda_the_table_still_has_bytes_and_predictions():
    reason = cuda_compiler_missing()  # TRITON_INTERPRET is set in this process: always a reason here
    assert reason is not None and SKIP_EXIT_CODE == 77
    run = subprocess.run([sys.executable, "-m", "hayabusa.bench.decode_occupancy", "--batches", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("no sm_90 compile here") and "qkv" in run.stdout and "MISS" not in run.stdout


def synthetic_profile(batch: int, prompt_len: int, us_of: dict[str, float]) -> dict:
    """A decode step's profile as kernel_profile.decode_step_kernels writes it: torch kernels and copies around the
    Triton kernels, in launch order."""
    table = decode_step_table(PRESETS["2.7b"], batch, prompt_len + WARM_STEPS + 1, None)
    layer = [row for row in table.rows if row.calls > 1]
    triton = layer * layer[0].calls + table.rows[len(layer):]
    kernels = [{"name": "Memcpy HtoD (Pinned -> Device)", "us": 2.0, "gap_before_us": 0.0},
               {"name": "void at::native::index_copy_kernel", "us": 2.0, "gap_before_us": 1.0},
               {"name": "void at::native::embedding_kernel", "us": 2.0, "gap_before_us": 1.0}]
    kernels += [{"name": row.kernel, "us": us_of[row.role], "gap_before_us": 1.5} for row in triton]
    kernels += [{"name": "void at::native::reduce_kernel (max)", "us": 3.0, "gap_before_us": 1.0}]
    return {"batch": batch, "prompt_len": prompt_len, "kernels": kernels, "step_us": 2500.0}


US_OF = {"qkv": 20.0, "attention": 4.0, "attention out": 8.0, "mlp in": 26.0, "mlp out": 26.0, "lm head": 70.0}


def test_a_gpu_profile_is_printed_beside_the_predictions(tmp_path):
    profile = synthetic_profile(1, 128, US_OF)
    table = decode_step_table(PRESETS["2.7b"], 1, 128 + WARM_STEPS + 1, None)
    rows = compare(table, profile, H200)
    assert [(r["role"], r["calls"], r["measured_us"]) for r in rows] == [
        (role, 32 if role != "lm head" else 1, us) for role, us in US_OF.items()]
    qkv = rows[0]
    assert qkv["miss"] == pytest.approx((20.0 + 1.5) / qkv["predicted_us"])
    assert qkv["measured_gb_per_s"] == pytest.approx(qkv["bytes"] / 20.0 / 1e3)
    printed = format_comparison(table, rows, H200, profile["step_us"])
    assert "H200" in printed and "qkv" in printed and "2500.0" in printed

    # the first light's JSON lines and a bench results.json both carry the profile
    jsonl = tmp_path / "figures.jsonl"
    jsonl.write_text(json.dumps({"event": "record"}) + "\n" + json.dumps({"event": "decode_kernels", **profile}) + "\n")
    assert load_profiles(jsonl) == ([{"event": "decode_kernels", **profile}], None)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "roofline": {"copy_bytes_per_s": 2.9e12},
                                   "decode_kernels": [profile]}))
    profiles, device = load_profiles(results)
    assert profiles == [profile] and device.copy_bytes_per_s == 2.9e12 and "H100" in device.name


def test_a_profile_from_another_launch_sequence_is_refused():
    profile = synthetic_profile(1, 128, US_OF)
    profile["kernels"] = [k for k in profile["kernels"] if k["name"] != "_decode_attention_kernel"]
    table = decode_step_table(PRESETS["2.7b"], 1, 128 + WARM_STEPS + 1, None)
    with pytest.raises(ValueError, match="another order than the 161 this checkout launches"):
        compare(table, profile, H100)


def test_results_md_shows_the_predictions_beside_the_measurements():
    rows = [{"role": "qkv", "calls": 32, "bytes": 39.4e6, "predicted_us": 15.1, "measured_us": 20.0,
             "gap_before_us": 1.5, "measured_gb_per_s": 1971.0, "miss": 1.42}]
    lines = _predicted_section({"copy_gb_per_s": 3000.0, "launch_cost_us": 2.0, "predicted_step_us": 2084.4,
                                "rows": rows})
    assert "bytes / 3,000 GB/s + 2.0 µs per launch" in lines[0] and any("| qkv | 32 | 39.40 | 15.10 |" in line
                                                                           for line in lines)
    assert _predicted_section({"unavailable": "the predictions failed here: X"}) == [
        "No predictions: the predictions failed here: X", ""]
