"""Print the decode step's occupancy table: every kernel of one decode step at the 2.7B shapes, per batch, with the
bytes it moves, its grid, registers / spills / shared memory from an sm_90 compile (no GPU needed), resident CTAs per
SM, waves on 132 SMs and predicted times on an H100 SXM and an H200 (engine/model/decode_occupancy.py); with
--profile, a GPU run's per-kernel decode profile (a bench results.json, or the first light's / bench's JSON lines)
beside the predictions.

    python -m hayabusa.bench.decode_occupancy [--batches 1 2 4] [--context 128] [--quantized] [--json table.json]
    python -m hayabusa.bench.decode_occupancy --profile results.json  # measured vs predicted, per kernel

Weight-streaming kernels are marked ok or MISS against the fill rule (>= 2 CTAs per SM, a whole number of waves or
>= 4). Run it without TRITON_INTERPRET; where Triton cannot compile for CUDA the table has no registers or residency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hayabusa.bench import sm90_compile_check as compile_check
from hayabusa.bench.kernel_profile import WARM_STEPS
from hayabusa.engine.core.paged_engine import DEFAULT_MAX_NUM_SEQS
from hayabusa.engine.loading.config import PRESETS, ModelConfig
from hayabusa.engine.model.decode_occupancy import (
    DEVICES,
    H100,
    H200,
    LAUNCH_COST_S,
    QUANTIZED_SCHEMES,
    CompileReport,
    DecodeStepTable,
    Device,
    Resources,
    decode_step_table,
    format_table,
    quantized_linear_table,
)
from hayabusa.engine.worker.shape_buckets import graph_batch_sizes
from hayabusa.kernels.gemv import GEMV_MAX_M
from hayabusa.kernels.launch_count import RecordedLaunch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CONTEXT = 128


def compiled_resources(launches: list[RecordedLaunch], jobs: int) -> dict[str, Resources]:
    """Resources of every distinct kernel among `launches`, by compile key, each compiled once for sm_90."""
    keyed = [compile_check.Launch(_key(launch), launch.kernel, launch.args, launch.kwargs) for launch in launches]
    results = compile_check.compile_distinct(keyed, jobs)
    failed = [f"{r.kernel}: {r.error}" for r in results if r.registers < 0]
    if failed:
        raise RuntimeError("sm_90 compile failed: " + "; ".join(failed))
    return {r.label: Resources(r.registers, r.spill_stores + r.spill_loads, r.shared, tuple(r.grid_dependency))
            for r in results}


def _key(launch: RecordedLaunch) -> str:
    return compile_check.compile_key(compile_check.Launch("", launch.kernel, launch.args, launch.kwargs))


def build_tables(batches: list[int], context_len: int, dtype: torch.dtype, jobs: int, compile: bool = True,
                 quantized_batches: list[int] = ()) -> list[DecodeStepTable]:
    """The 2.7B decode step's table at each batch, then its linear layers on each quantized scheme at each of
    quantized_batches; compiled for sm_90 unless compile is False."""
    config = PRESETS["2.7b"]

    def tables_with(report: CompileReport | None) -> list[DecodeStepTable]:
        return ([decode_step_table(config, batch, context_len, report, dtype) for batch in batches]
                + [quantized_linear_table(config, scheme, batch, report, dtype)
                   for scheme in QUANTIZED_SCHEMES for batch in quantized_batches])

    tables = tables_with(None)
    if not compile:
        return tables
    resources = compiled_resources([row.launch for table in tables for row in table.rows], jobs)
    return tables_with(lambda launch: resources[_key(launch)])


def load_profiles(path: Path) -> tuple[list[dict[str, Any]], Device | None]:
    """The per-kernel decode profiles of a GPU run (bench results.json, or JSON lines whose event is decode_kernels)
    and the device its bandwidth was measured on (results.json's roofline), if the file says."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        results = json.loads(text)
        device = None
        roofline = results.get("roofline") or {}
        if roofline.get("copy_bytes_per_s"):
            device = Device(results.get("device", "this run's GPU"), 132, roofline["copy_bytes_per_s"],
                            "copy bandwidth measured in this run")
        return results.get("decode_kernels", []), device
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "decode_kernels"], None


def compare(table: DecodeStepTable, profile: dict[str, Any], device: Device) -> list[dict[str, Any]]:
    """Per row of the table: predicted and measured microseconds per call (the measured kernels of the profile are
    the Triton kernels in launch order: one layer's kernels per layer, then the LM head's)."""
    layer = [row for row in table.rows if row.calls > 1]
    expected = layer * layer[0].calls + table.rows[len(layer):]
    names = {row.kernel for row in table.rows}
    measured = [k for k in profile["kernels"] if k["name"] in names]
    if [k["name"] for k in measured] != [row.kernel for row in expected]:
        raise ValueError(f"the profile of batch {profile['batch']} holds {len(measured)} of the step's Triton kernels "
                         f"in another order than the {len(expected)} this checkout launches: another commit's run?")
    per_row: dict[int, list[dict[str, Any]]] = {}
    for row, kernel in zip(expected, measured, strict=True):
        per_row.setdefault(id(row), []).append(kernel)
    out = []
    for row in table.rows:
        kernels = per_row[id(row)]
        us = sum(k["us"] for k in kernels) / len(kernels)
        gap = sum(k["gap_before_us"] for k in kernels) / len(kernels)
        out.append({"role": row.role, "kernel": row.kernel, "calls": row.calls, "bytes": row.bytes,
                    "predicted_us": row.predicted_us(device), "measured_us": us, "gap_before_us": gap,
                    "measured_gb_per_s": row.bytes / us / 1e3, "miss": (us + gap) / row.predicted_us(device)})
    return out


def predicted_beside(profile: dict[str, Any], config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     copy_bytes_per_s: float) -> dict[str, Any]:
    """A GPU run's decode-step profile (kernel_profile.decode_step_kernels) against the predictions from the copy
    bandwidth measured in the same run; no compile (predictions need bytes only)."""
    from hayabusa.kernels._launch import device_limits

    context = profile["prompt_len"] + WARM_STEPS + 1
    table = decode_step_table(config, profile["batch"], context, None, dtype, device_limits(device))
    measured_on = Device(torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                         device_limits(device).num_sms, copy_bytes_per_s, "copy bandwidth measured in this run")
    return {"context": context, "launch_cost_us": LAUNCH_COST_S * 1e6, "copy_gb_per_s": copy_bytes_per_s / 1e9,
            "predicted_step_us": table.predicted_step_us(measured_on), "rows": compare(table, profile, measured_on)}


def format_comparison(table: DecodeStepTable, rows: list[dict[str, Any]], device: Device, step_us: float) -> str:
    lines = [f"measured vs predicted, batch {table.batch}, context {table.context_len}: {device.name}, "
             f"{device.copy_bytes_per_s / 1e12:.2f} TB/s ({device.measured}) + {LAUNCH_COST_S * 1e6:.1f} us per "
             "launch",
             f"{'kernel':<16}{'calls':>6}{'predicted us':>14}{'measured us':>13}{'gap us':>8}{'GB/s':>8}"
             f"{'(measured + gap) / predicted':>30}"]
    lines += [f"{r['role']:<16}{r['calls']:>6}{r['predicted_us']:>14.2f}{r['measured_us']:>13.2f}"
              f"{r['gap_before_us']:>8.2f}{r['measured_gb_per_s']:>8.0f}{r['miss']:>30.2f}" for r in rows]
    lines.append(f"{'step':<16}{table.launches:>6}{table.predicted_step_us(device):>14.1f}{step_us:>13.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"decode batch sizes (default: every CUDA-graph batch the engine captures at "
                             f"max_num_seqs {DEFAULT_MAX_NUM_SEQS})")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help="positions each sequence attends, the new one included (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--quantized", action="store_true",
                        help="also the linear layers on int8 / int4 weights (issue 18's presets) at each batch <= 4")
    parser.add_argument("--profile", type=Path, help="a GPU run's results.json or JSON lines with decode_kernels")
    parser.add_argument("--device", choices=("h100", "h200"), default=None,
                        help="the bandwidth to predict --profile's times with (default: the run's measured one, "
                             "else the H100's)")
    parser.add_argument("--json", type=Path, help="also write the tables (and comparisons) to this file")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compiles")
    args = parser.parse_args(argv)
    reason = compile_check.cuda_compiler_missing()
    if reason is not None:
        print(f"no sm_90 compile here ({reason}): bytes, grids and predictions only")
    dtype = DTYPES[args.dtype]
    out: dict[str, Any] = {"tables": [], "comparisons": []}
    if args.profile is not None:
        profiles, run_device = load_profiles(args.profile)
        if not profiles:
            print(f"{args.profile} holds no per-kernel decode profile (a GPU run's kernels scenario)")
            return 1
        device = {"h100": H100, "h200": H200}.get(args.device) or run_device or H100
        for profile in profiles:
            context = profile["prompt_len"] + WARM_STEPS + 1  # the profiled step follows the prefill and warm steps
            table, = build_tables([profile["batch"]], context, dtype, args.jobs, compile=reason is None)
            rows = compare(table, profile, device)
            print(format_table(table, (device,)) + "\n\n" + format_comparison(table, rows, device, profile["step_us"])
                  + "\n")
            out["comparisons"].append({"batch": table.batch, "context": context, "device": device.name, "rows": rows})
    else:
        batches = args.batches or graph_batch_sizes(DEFAULT_MAX_NUM_SEQS)
        quantized_batches = [batch for batch in batches if batch <= GEMV_MAX_M] if args.quantized else []
        for table in build_tables(batches, args.context, dtype, args.jobs, reason is None, quantized_batches):
            print(format_table(table) + "\n")
            out["tables"].append(table_dict(table))
        bandwidths = ", ".join(f"{d.name} {d.copy_bytes_per_s / 1e12:.1f} TB/s ({d.measured})" for d in DEVICES)
        print(f"predicted: bytes / copy bandwidth ({bandwidths}) + {LAUNCH_COST_S * 1e6:.1f} us per launch")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


def table_dict(table: DecodeStepTable) -> dict[str, Any]:
    return {"title": table.title, "batch": table.batch, "context": table.context_len, "launches": table.launches,
            "predicted_step_us": {d.name: table.predicted_step_us(d) for d in DEVICES},
            "rows": [{"role": r.role, "kernel": r.kernel, "calls": r.calls, "bytes": r.bytes, "grid": list(r.grid),
                      "num_warps": r.num_warps, "registers": r.resources.registers if r.resources else None,
                      "spill_bytes": r.resources.spill_bytes if r.resources else None,
                      "shared_bytes": r.resources.shared_bytes if r.resources else None,
                      "grid_dependency": list(r.resources.grid_dependency) if r.resources else None,
                      "resident": r.resident,
                      "limiter": r.limiter, "waves": r.waves, "fills_the_chip": r.fills_the_chip(),
                      "predicted_us": {d.name: r.predicted_us(d) for d in DEVICES}} for r in table.rows]}


if __name__ == "__main__":
    sys.exit(main())
