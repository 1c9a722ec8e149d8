"""Run the whole comparison: roofline first, then each engine in turn over the chosen scenarios.

One engine is loaded at a time (and unloaded before the next) so they never share device memory. An engine
that cannot run here is skipped with its reason; one that fails mid-run is recorded with its error, and the
others still run.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hayabusa.bench import environment, scenarios
from hayabusa.bench.records import BenchRecord
from hayabusa.bench.roofline import DeviceRoofline, measure_roofline
from hayabusa.bench.runners import BenchRunner, EngineUnavailable, make_runner
from hayabusa.bench.tokenizer_scenario import run_tokenizer
from hayabusa.bench.workloads import SuiteSizes
from hayabusa.engine.config import ModelConfig
from hayabusa.engine.kernel_plan import decode_step_launches
from hayabusa.kernels._launch import H200, device_limits

TOKENIZER_ENGINES = ("hayabusa", "transformers-eager")  # hayabusa.tokenizer and transformers' tokenizer
Case = tuple[str, str, Callable[[BenchRunner], BenchRecord]]  # (scenario, label, measure(runner))


@dataclass
class SuiteSettings:
    model: str  # what the user passed: a preset name, a directory or a Hub id
    model_dir: Path
    preset: str | None
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    sizes: SuiteSizes
    scenarios: tuple[str, ...]
    engines: tuple[str, ...]
    engines_requested: bool  # True when the user named the engines (forces ones skipped by default)


@dataclass
class SuiteResult:
    settings: SuiteSettings
    roofline: DeviceRoofline
    records: list[BenchRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # cannot run here: {engine, scenario, reason}
    errors: list[dict[str, str]] = field(default_factory=list)  # measurements that failed: {engine, scenario, error}
    launches_per_decode_step: dict[str, Any] = field(default_factory=dict)  # hayabusa's, counted (see launch_counts)
    started: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "schema_version": 1,
            "created": self.started,
            "seconds": self.seconds,
            "device": environment.device_description(s.device),
            "device_type": s.device.type,
            "driver": environment.driver_version(s.device),
            "commit": environment.git_commit(),
            "versions": environment.package_versions(),
            "dtype": str(s.dtype).removeprefix("torch."),
            "model": {"source": s.model, "dir": str(s.model_dir), "preset": s.preset,
                      "random_weights": s.preset is not None, "config": s.config.to_hf_dict()},
            "sizes": s.sizes.as_dict(),
            "scenarios": list(s.scenarios),
            "engines": list(s.engines),
            "roofline": self.roofline.as_dict(),
            "skipped": self.skipped,
            "errors": self.errors,
            "records": [r.as_dict() for r in self.records],
            "launches_per_decode_step": self.launches_per_decode_step,
        }


def run_suite(settings: SuiteSettings) -> SuiteResult:
    started = datetime.datetime.now(datetime.timezone.utc)
    sizes = settings.sizes
    device_roofline = measure_roofline(settings.device, settings.dtype, sizes.roofline_copy_bytes,
                                       sizes.roofline_matmul_size)
    result = SuiteResult(settings, device_roofline, started=started.isoformat(timespec="seconds"),
                         launches_per_decode_step=launch_counts(settings))
    cases = generation_cases(settings, device_roofline)
    tokenizer_engines = [e for e in settings.engines if e in TOKENIZER_ENGINES and "tokenizer" in settings.scenarios]
    total = len(settings.engines) * len(cases) + len(tokenizer_engines)
    with tqdm(total=total, desc="hayabusa bench", unit="case", dynamic_ncols=True) as progress:
        for engine in settings.engines:
            if cases:
                _run_engine(engine, cases, settings, result, progress)
        for engine in tokenizer_engines:
            progress.set_postfix_str(f"{engine} tokenizer")
            _guarded(result, engine, "tokenizer",
                     lambda e=engine: result.records.extend(run_tokenizer(e, settings.model_dir, sizes)))
            progress.update(1)
    result.seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return result


def launch_counts(settings: SuiteSettings) -> dict[str, Any]:
    """hayabusa's kernel launches per decode step at each decode batch, counted without running (FastModel on meta
    tensors) with the configs of this GPU, or of an H200 when the run is on a CPU."""
    on_gpu = settings.device.type == "cuda"
    limits = device_limits(settings.device) if on_gpu else H200
    counts = [decode_step_launches(settings.config, batch, dtype=settings.dtype, limits=limits).as_dict()
              for batch in settings.sizes.decode_batches]
    return {"configs_of": "this device" if on_gpu else "H200 (simulated: 132 SMs)", "num_sms": limits.num_sms,
            "by_batch": counts}


def generation_cases(settings: SuiteSettings, device_roofline: DeviceRoofline) -> list[Case]:
    """(scenario, label, measure) for every generation case of the run, load first."""
    sizes, config, chosen = settings.sizes, settings.config, settings.scenarios
    cases: list[Case] = []
    if "load" in chosen:
        cases.append(("load", "load", lambda runner: scenarios.run_load(runner, sizes)))
    if "decode" in chosen:
        cases += [("decode", f"batch {b}", partial(scenarios.run_decode, sizes=sizes, config=config,
                                                   device_roofline=device_roofline, batch=b))
                  for b in sizes.decode_batches]
    if "prefill" in chosen:
        cases += [("prefill", f"prompt {n}", partial(scenarios.run_prefill, sizes=sizes, config=config,
                                                     device_roofline=device_roofline, prompt_len=n))
                  for n in sizes.prefill_prompt_lens]
    if "throughput" in chosen:
        cases += [("throughput", case, partial(scenarios.run_throughput, sizes=sizes, case=case, prompts=prompts,
                                               gen_lens=gen_lens))
                  for case, prompts, gen_lens in scenarios.throughput_workloads(sizes)]
    return cases


def _run_engine(engine: str, cases: list[Case], settings: SuiteSettings, result: SuiteResult,
                progress: tqdm) -> None:
    try:
        runner = make_runner(engine, settings.model_dir, settings.dtype, settings.device, settings.sizes.static_batch,
                             settings.engines_requested)
    except EngineUnavailable as err:
        result.skipped.append({"engine": engine, "scenario": "all", "reason": str(err)})
        progress.update(len(cases))
        return
    try:
        if cases[0][0] != "load":
            progress.set_postfix_str(f"{engine} load")
            if not _guarded(result, engine, "load", runner.load):
                progress.update(len(cases))
                return
        for done, (scenario, label, measure) in enumerate(cases):
            progress.set_postfix_str(f"{engine} {scenario} {label}")
            ok = _guarded(result, engine, scenario, lambda m=measure: result.records.append(m(runner)))
            progress.update(1)
            if not ok and scenario == "load":  # nothing else can run without the model
                progress.update(len(cases) - done - 1)
                return
    finally:
        runner.unload()


def _guarded(result: SuiteResult, engine: str, scenario: str, fn: Callable[[], object]) -> bool:
    """Run one measurement; a failure is recorded (and printed) instead of ending the whole suite."""
    try:
        fn()
        return True
    except EngineUnavailable as err:
        result.skipped.append({"engine": engine, "scenario": scenario, "reason": str(err)})
    except Exception as err:  # noqa: BLE001 - any engine failure must be reported, not hide the other engines
        result.errors.append({"engine": engine, "scenario": scenario, "error": f"{type(err).__name__}: {err}"})
        tqdm.write(f"[{engine} {scenario}] failed:\n{traceback.format_exc()}")
    if torch.cuda.is_available():  # e.g. after an out-of-memory error, before the next case allocates
        torch.cuda.empty_cache()
    return False
