"""Issue 9's GPU targets for hayabusa (set for one H200), checked against a saved run's results.

A target is judged only from figures measured in that run on a CUDA device; on a CPU run, or where a figure is
missing, it is reported as not evaluated, never as met.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hayabusa.bench.records import speedup

Results = dict[str, Any]


@dataclass(frozen=True)
class Target:
    text: str
    measure: Callable[[Results], float | None]  # the figure from the run's records (None: not measured)
    unit: str
    passes: Callable[[float], bool]


def _record(results: Results, engine: str, scenario: str, case: str) -> dict[str, Any] | None:
    """The engine's record of the case on dense weights (the targets were set for fp16)."""
    return next((r for r in results["records"] if r["engine"] == engine and r["scenario"] == scenario
                 and r["case"] == case and not r.get("quantization")), None)


def _figure(engine: str, scenario: str, case: str, key: str) -> Callable[[Results], float | None]:
    def measure(results: Results) -> float | None:
        record = _record(results, engine, scenario, case)
        return None if record is None else record[key]
    return measure


def _ratio(case: str, key: str, baseline: str, higher_is_better: bool) -> Callable[[Results], float | None]:
    """hayabusa's figure over the baseline engine's on the same case, as a speed-up (> 1: hayabusa faster)."""
    def measure(results: Results) -> float | None:
        ours, theirs = _record(results, "hayabusa", "decode", case), _record(results, baseline, "decode", case)
        return None if ours is None or theirs is None else speedup(ours, theirs, key, higher_is_better)
    return measure


TARGETS = (
    Target("decode, batch 1: <= 1.5 ms / token", _figure("hayabusa", "decode", "batch1", "ms_per_token"), "ms",
           lambda ms: ms <= 1.5),
    Target("decode, batch 1: >= 80% of the copy bandwidth measured in the run",
           _figure("hayabusa", "decode", "batch1", "pct_roofline"), "%", lambda pct: pct >= 80),
    Target("decode, batch 1: >= 1.5x transformers static cache + compile",
           _ratio("batch1", "ms_per_token", "transformers-compile", False), "x", lambda x: x >= 1.5),
    Target("decode, batch 1: >= 6x transformers eager", _ratio("batch1", "ms_per_token", "transformers-eager", False),
           "x", lambda x: x >= 6),
    Target("decode, batch 64: >= 20x transformers eager throughput",
           _ratio("batch64", "tokens_per_s", "transformers-eager", True), "x", lambda x: x >= 20),
    Target("prefill, 2048-token prompt: <= 20 ms", _figure("hayabusa", "prefill", "prompt2048", "ms"), "ms",
           lambda ms: ms <= 20),
)


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    """[{target, measured, unit, met}] with met None (not evaluated) off a GPU or without the figure."""
    on_gpu = results.get("device_type") == "cuda"
    rows = []
    for target in TARGETS:
        measured = target.measure(results) if on_gpu else None
        rows.append({"target": target.text, "measured": measured, "unit": target.unit,
                     "met": None if measured is None else target.passes(measured)})
    return rows
