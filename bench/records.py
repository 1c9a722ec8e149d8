"""One measured figure: the row every scenario produces and results.json / results.md / results.png read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ENGINES = ("hayabusa", "hayabusa-reference", "transformers-eager", "transformers-compile", "openvino", "openvino-int8",
           "openvino-int4")
SCENARIOS = ("decode", "prefill", "throughput", "speculation", "load", "tokenizer", "serve", "structured")
# `serve` runs only when named: it needs the [serve] extra and locust, and a server of its own for minutes
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in ("serve", "structured"))
# --scenarios also takes this: hayabusa's per-kernel table of one decode step per decode case (results.json's
# decode_kernels; CUDA only), which makes no record of its own.
KERNEL_TABLE = "kernels"
# Keys every record in results.json carries (None where a figure does not apply to the scenario).
RECORD_KEYS = ("engine", "scenario", "case", "batch", "prompt_len", "gen_len", "ms_per_token", "ms",
               "tokens_per_s", "pct_roofline", "roofline_basis", "repeats", "samples_ms", "warmup_ms", "extra",
               "quantization")


@dataclass
class BenchRecord:
    engine: str  # one of ENGINES
    scenario: str  # one of SCENARIOS
    case: str  # e.g. "batch8", "prompt512", "uniform", "mixed", "encode", "users32"
    batch: int | None  # sequences decoded together / requests submitted / texts tokenized / concurrent users
    prompt_len: int | None  # prompt tokens per request (the mean for a mixed set)
    gen_len: int | None  # generated tokens per request, forced (the mean for a mixed set)
    ms_per_token: float | None  # decode: median ms per decode step (one token for each of `batch` sequences)
    ms: float | None  # median wall time of the timed call
    tokens_per_s: float | None
    pct_roofline: float | None  # 100 * device floor / measured (decode: bandwidth floor, prefill: matmul floor)
    roofline_basis: str | None  # "bandwidth" | "matmul" | None
    repeats: int
    samples_ms: list[float]  # every timed sample, warm-up excluded
    warmup_ms: float | None  # the first (untimed) call: compilation and cold caches show up here
    extra: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None  # the engine's quantized weights (scheme names joined by "+"); None: dense

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"record engine {self.engine!r} is not one of {ENGINES}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"record scenario {self.scenario!r} is not one of {SCENARIOS}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_label(record: dict[str, Any]) -> str:
    """The engine and, for quantized weights, their scheme: "hayabusa-reference W4A16"."""
    return record["engine"] + (f" {record['quantization']}" if record.get("quantization") else "")


def speedup(ours: dict[str, Any], base: dict[str, Any], key: str, higher_is_better: bool) -> float | None:
    """ours[key] relative to base[key] as a speed-up (> 1: ours is better); None when either is missing or zero."""
    if not ours[key] or not base[key]:
        return None
    return ours[key] / base[key] if higher_is_better else base[key] / ours[key]
