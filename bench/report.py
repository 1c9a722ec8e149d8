"""Write a run's results: results.json (everything, every sample), results.md (tables), results.png (plots).

The markdown and the plot are made from the JSON dict alone, so they can be redrawn from a saved run:
`python -m hayabusa.bench.report results.json`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hayabusa.bench.kernel_profile import kernel_summary
from hayabusa.bench.preflight import plot_library_missing
from hayabusa.bench.records import ENGINES, engine_label, speedup
from hayabusa.bench.targets import evaluate_targets

BASELINE = "transformers-eager"  # the "x vs" columns compare with what users run today


def write_results(results: dict[str, Any], out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """results.json and results.md, and results.png when `plot`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_report(results), encoding="utf-8")
    if plot:
        paths["png"] = out_dir / "results.png"
        write_plot(results, paths["png"])
    return paths


def _records(results: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    """The scenario's records grouped by case (in the order they were run), engines in ENGINES order, each engine's
    quantized variants after its dense run (in the order they were run)."""
    rows = [r for r in results["records"] if r["scenario"] == scenario]
    case_order = {case: i for i, case in enumerate(dict.fromkeys(r["case"] for r in rows))}  # first-seen order
    variant_order = {q: i for i, q in enumerate(dict.fromkeys(r.get("quantization") for r in rows))}
    return sorted(rows, key=lambda r: (case_order[r["case"]], ENGINES.index(r["engine"]),
                                       r.get("quantization") is not None, variant_order[r.get("quantization")]))


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _speedup(rows: list[dict[str, Any]], row: dict[str, Any], key: str, higher_is_better: bool) -> str:
    """row's figure relative to the baseline engine's on the same case ("1.00x" for the baseline itself)."""
    base = next((r for r in rows if r["engine"] == BASELINE and not r.get("quantization")
                 and r["case"] == row["case"]), None)
    ratio = None if base is None else speedup(row, base, key, higher_is_better)
    return "–" if ratio is None else f"{ratio:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(results: dict[str, Any]) -> str:
    sizes, model, roof = results["sizes"], results["model"], results["roofline"]
    weights = f"random weights, preset `{model['preset']}`" if model["random_weights"] else f"`{model['source']}`"
    lines = [
        f"# hayabusa bench: {weights}, {results['dtype']}",
        "",
        f"- **Device**: {results['device']}" + (f"; {results['driver']}" if results.get("driver") else ""),
        f"- **Date**: {results['created']} · {_code_line(results)} · torch {results['versions']['torch']}"
        f" · triton {results['versions'].get('triton')} · transformers {results['versions'].get('transformers')}",
        f"- **Sizes**: `{sizes['name']}`; median of {sizes['repeats']} timed runs after {sizes['warmup']} warm-up;"
        " same prompts and forced token counts (end-of-sequence ignored) for every engine",
        f"- **Roofline measured in this run**: copy {roof['copy_gb_per_s']:.1f} GB/s"
        + (f", read {roof['read_gb_per_s']:.1f} GB/s" if roof.get("read_gb_per_s") else "")
        + f", {roof['dtype']} matmul "
        f"{_flop_rate(roof['matmul_tflops'])} (n = {roof['matmul_size']})"
        + (f"; each the fastest of {roof['timed_runs']} timed runs" if "timed_runs" in roof else ""),
        *_machine_lines(results),
        *_peer_settings_lines(results),
        "",
    ]
    sections: list[tuple[str, str, Callable[[list[dict[str, Any]]], list[str]]]] = [
        ("decode", f"## Decode latency (prompt {sizes['decode_prompt_len']}, {sizes['decode_gen_len']} tokens)",
         _decode_table),
        ("prefill", "## Prefill: time to first token (one prompt)", _prefill_table),
        ("throughput", "## Offline throughput (all requests at once)", _throughput_table),
        ("speculation", "## Prompt-lookup speculation (one request continuing a passage of its prompt)",
         _speculation_table),
        ("load", "## Weight load (checkpoint dir to ready model, warm page cache)", _load_table),
        ("tokenizer", "## Tokenizer", _tokenizer_table),
        ("serve", "## Serving: `hayabusa serve` under locust's streaming users (prompt "
                  f"{sizes.get('serve_prompt_len')}, {sizes.get('serve_gen_len')} tokens, "
                  f"{sizes.get('serve_seconds')} s per row; latencies as the client sees them)", _serve_table),
        ("structured", "## Structured outputs: per decode step, constrained (JSON schema) vs not (prompt "
                       f"{sizes['decode_prompt_len']}, {sizes['decode_gen_len']} tokens)", _structured_table),
    ]
    for scenario, title, table in sections:
        rows = _records(results, scenario)
        if rows:
            lines += [title, "", *table(rows), ""]
    lines += _kernel_section(results.get("decode_kernels", []))
    lines += _targets_section(results)
    if results["skipped"]:
        lines += ["## Not run here", ""]
        lines += [f"- `{s['engine']}` ({s['scenario']}): {s['reason']}" for s in results["skipped"]] + [""]
    if results["errors"]:
        lines += ["## Failed measurements", ""]
        lines += [f"- `{e['engine']}` {e['scenario']}: {e['error']}" for e in results["errors"]] + [""]
    return "\n".join(lines)


def _structured_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| batch | unconstrained, ms / step | constrained, ms / step | masks' cost, ms / step |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['extra']['unconstrained_ms_per_step']:.2f} | {r['ms_per_token']:.2f} | "
                     f"{r['extra']['mask_cost_ms_per_step']:.2f} |")
    return lines


def _code_line(results: dict[str, Any]) -> str:
    """The commit and where it was found; without one, what ran instead (runs saved before commit_source was
    recorded have only the commit)."""
    commit, source = results["commit"], results.get("commit_source")
    if commit is None:
        return f"**hayabusa** {results['versions'].get('hayabusa')} ({source or 'no commit known'})"
    return f"**commit** `{commit}`" + (f" ({source})" if source else "")


def _flop_rate(tflops: float) -> str:
    return f"{tflops:.2f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def _machine_lines(results: dict[str, Any]) -> list[str]:
    """Threads, machine load and the run's warnings (runs saved before they were recorded have none of them)."""
    load = results.get("machine_load", {}).get("start")
    if load is None:
        return []
    line = (f"- **Machine**: {results['torch_threads']} torch threads at the start; load average "
            f"{load['loadavg_1m']}, other processes busy on {load['other_busy_cpus']} of {load['cpus']} CPUs")
    return [line] + [f"- **Warning**: {warning}" for warning in results.get("warnings", [])]


def _peer_settings_lines(results: dict[str, Any]) -> list[str]:
    """One line per OpenVINO variant: the settings its compiled model reported (they decide what it computes)."""
    settings = {r["engine"]: r["extra"]["openvino"] for r in results["records"] if "openvino" in r["extra"]}
    return [f"- **{engine} settings**: " + ", ".join(f"{key} {value}" for key, value in values.items())
            for engine, values in settings.items()]


def _case_load(r: dict[str, Any]) -> tuple[str, str]:
    """(torch threads, CPUs other processes kept busy) just before the case, where recorded."""
    load = r["extra"].get("machine_load", {})
    return str(r["extra"].get("torch_threads", "–")), _fmt(load.get("other_busy_cpus"))


def _decode_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["engine", "weights", "batch", "prompt", "ms / token", "tokens / s", "% of bandwidth floor",
                   "weights GB / s", "% of weight-read floor", "vs eager", "threads", "others' CPUs"],
                  [[engine_label(r), r["extra"].get("weight_format", "–"), str(r["batch"]), str(r["prompt_len"]),
                    _fmt(r["ms_per_token"]), _fmt(r["tokens_per_s"], 1), _fmt(r["pct_roofline"], 1),
                    _fmt(r["extra"].get("weight_gb_per_s")), _fmt(r["extra"].get("pct_read_bandwidth_weights"), 1),
                    _speedup(rows, r, "ms_per_token", False), *_case_load(r)] for r in rows])


def _prefill_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["engine", "prompt", "ms", "tokens / s", "% of matmul peak", "vs eager"],
                  [[engine_label(r), str(r["prompt_len"]), _fmt(r["ms"]), _fmt(r["tokens_per_s"], 1),
                    _fmt(r["pct_roofline"], 1), _speedup(rows, r, "ms", False)] for r in rows])


def _throughput_table(rows: list[dict[str, Any]]) -> list[str]:
    def lengths(r: dict[str, Any]) -> tuple[str, str]:
        if r["case"] != "mixed":
            return str(r["prompt_len"]), str(r["gen_len"])
        (p0, p1), (g0, g1) = r["extra"]["prompt_len_range"], r["extra"]["gen_len_range"]
        return f"{p0}–{p1}", f"{g0}–{g1}"

    return _table(["engine", "set", "requests", "prompt", "generated", "s", "generated tokens / s", "vs eager"],
                  [[engine_label(r), r["case"], str(r["batch"]), *lengths(r), _fmt(r["ms"] / 1e3),
                    _fmt(r["tokens_per_s"], 1), _speedup(rows, r, "tokens_per_s", True)] for r in rows])


def _speculation_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["engine", "drafts", "prompt", "generated", "ms", "ms without", "speed-up", "acceptance",
                   "tokens / forward pass"],
                  [[engine_label(r), r["case"].rsplit("-", 1)[1], str(r["prompt_len"]), str(r["gen_len"]),
                    _fmt(r["ms"]),
                    _fmt(r["extra"]["plain_ms"]), f"{r['extra']['speedup']:.2f}x",
                    f"{100 * r['extra']['acceptance_rate']:.0f}%", _fmt(r["extra"]["tokens_per_forward_pass"])]
                   for r in rows])


def _load_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["engine", "ms", "GB / s", "vs eager", "cold start, empty Triton cache (ms)",
                   "warm start, Triton cache reused (ms)", "threads", "others' CPUs"],
                  [[engine_label(r), _fmt(r["ms"]), _fmt(r["extra"]["gb_per_s"]), _speedup(rows, r, "ms", False),
                    _fmt(r["extra"].get("cold_start_ms")), _fmt(r["extra"].get("warm_start_ms")),
                    *_case_load(r)] for r in rows])


def _kernel_section(tables: list[dict[str, Any]]) -> list[str]:
    """One decode step of hayabusa per case: totals, then its kernels by total time (CUDA runs only)."""
    if not tables:
        return []
    lines = ["## One hayabusa decode step, kernel by kernel (torch.profiler)", "",
             *_table(["weights", "batch", "prompt", "step µs (first kernel start to last end)", "kernel µs",
                      "gaps µs", "kernels"],
                     [[t.get("quantization") or "dense", str(t["batch"]), str(t["prompt_len"]), _fmt(t["step_us"], 1),
                       _fmt(t["kernel_us"], 1), _fmt(t["gap_us"], 1), str(t["launches"])] for t in tables]), ""]
    for t in tables:
        weights = f", {t['quantization']} weights" if t.get("quantization") else ""
        lines += [f"Batch {t['batch']}, prompt {t['prompt_len']}{weights} (gaps: idle GPU time before each call):", "",
                  *_table(["kernel", "calls", "total µs", "mean µs", "gaps before µs"],
                          [[f"`{k['name'][:80]}`", str(k["calls"]), _fmt(k["total_us"], 1), _fmt(k["mean_us"], 1),
                            _fmt(k["gap_before_us"], 1)] for k in kernel_summary(t["kernels"])]), ""]
        lines += _predicted_section(t.get("vs_predicted"))
    return lines


def _predicted_section(predicted: dict[str, Any] | None) -> list[str]:
    """Each Triton kernel's measured time per call beside its prediction (bytes over the run's copy bandwidth plus
    a launch cost): the ratio says which kernels miss and by how much."""
    if not predicted:
        return []
    if "unavailable" in predicted:
        return [f"No predictions: {predicted['unavailable']}", ""]
    bandwidth, launch_cost = _fmt(predicted["copy_gb_per_s"], 0), _fmt(predicted["launch_cost_us"], 1)
    return [f"Predicted (bytes / {bandwidth} GB/s + {launch_cost} µs per launch; step "
            f"{_fmt(predicted['predicted_step_us'], 1)} µs) vs measured, per call:", "",
            *_table(["kernel", "calls", "MB", "predicted µs", "measured µs", "gap before µs", "GB / s",
                     "(measured + gap) / predicted"],
                    [[r["role"], str(r["calls"]), _fmt(r["bytes"] / 1e6, 2), _fmt(r["predicted_us"], 2),
                      _fmt(r["measured_us"], 2), _fmt(r["gap_before_us"], 2), _fmt(r["measured_gb_per_s"], 0),
                      _fmt(r["miss"], 2)] for r in predicted["rows"]]), ""]


def _targets_section(results: dict[str, Any]) -> list[str]:
    rows = evaluate_targets(results)
    verdict = {True: "met", False: "**missed**", None: "not evaluated"}
    note = "" if results.get("device_type") == "cuda" else " (not evaluated: no GPU in this run; never claimed)"
    return ["## Issue 9's GPU targets (set for one H200)" + note, "",
            *_table(["target", "measured", "result"],
                    [[r["target"], "–" if r["measured"] is None else f"{_fmt(r['measured'])} {r['unit']}",
                      verdict[r["met"]]] for r in rows]), ""]


def _tokenizer_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["tokenizer", "case", "texts", "ms", "tokens / s", "chars / s"],
                  [[r["engine"], r["case"], str(r["batch"]), _fmt(r["ms"]), _fmt(r["tokens_per_s"], 0),
                    _fmt(r["extra"]["chars_per_s"], 0)] for r in rows])


def _serve_table(rows: list[dict[str, Any]]) -> list[str]:
    def errors(r: dict[str, Any]) -> str:
        return ", ".join(f"{kind}: {count}" for kind, count in r["extra"]["errors"].items()) or "none"

    return _table(["engine", "users", "requests", "requests / s", "tokens / s", "TTFT p50 ms", "TTFT p99 ms",
                   "ITL p50 ms", "ITL p99 ms", "errors", "others' CPUs"],
                  [[r["engine"], str(r["batch"]), str(r["extra"]["completed"]), _fmt(r["extra"]["requests_per_s"]),
                    _fmt(r["tokens_per_s"], 1), _fmt(r["extra"]["ttft_p50_ms"], 1), _fmt(r["extra"]["ttft_p99_ms"], 1),
                    _fmt(r["extra"]["itl_p50_ms"], 1), _fmt(r["extra"]["itl_p99_ms"], 1), errors(r),
                    _case_load(r)[1]] for r in rows])


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Three panels: decode latency vs batch, decode throughput vs concurrency, time to first token vs prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = [("decode", "batch", "ms_per_token", "decode latency", "ms / token"),
              ("decode", "batch", "tokens_per_s", "decode throughput vs concurrency", "tokens / s"),
              ("prefill", "prompt_len", "ms", "time to first token", "ms")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for ax, (scenario, x_key, y_key, title, y_label) in zip(axes, panels, strict=True):
        rows = [r for r in _records(results, scenario) if "-prompt" not in r["case"]]  # one context per curve
        for label in dict.fromkeys(map(engine_label, rows)):  # one curve per engine and quantization
            points = sorted((r[x_key], r[y_key]) for r in rows if engine_label(r) == label and r[y_key] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("sequences decoded together" if x_key == "batch" else "prompt tokens")
        ax.set_ylabel(y_label)
        if rows:
            ticks = sorted({r[x_key] for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"hayabusa bench: {results['device']}, {results['dtype']}", fontsize="medium")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Redraw results.md and results.png beside a saved results.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hayabusa.bench.report RESULTS_JSON", file=sys.stderr)
        return 2
    json_path = Path(args[0])
    results = json.loads(json_path.read_text(encoding="utf-8"))
    (json_path.parent / "results.md").write_text(markdown_report(results), encoding="utf-8")
    missing = plot_library_missing()  # the markdown needs no optional package
    if missing:
        print(f"warning: {missing}", file=sys.stderr)
    else:
        write_plot(results, json_path.parent / "results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
