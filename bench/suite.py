"""Run the whole comparison: roofline first, then each engine in turn over the chosen scenarios.

One engine is loaded at a time (and unloaded before the next) so they never share device memory. An engine
that cannot run here, or whose runner cannot be built here, is skipped with its reason; one that fails mid-run is
recorded with its error, and the others still run. With a JSON-lines file (`--jsonl`), every figure, skip, failure
and kernel table is appended to it the moment it exists, so a run cut short keeps what it measured.

Every case records the machine's load just before it and torch's CPU thread count; each engine starts from the
run's thread count, whatever the engine before it chose. A busy machine is warned about once: at
the start (other processes, or a high load average before the run adds its own), and once for all the cases
other processes disturbed (the load average then counts the benchmark itself, so only others' CPU time does).
"""

from __future__ import annotations

import datetime
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hayabusa.bench import environment, scenarios
from hayabusa.bench.kernel_profile import decode_step_kernels
from hayabusa.bench.records import KERNEL_TABLE, BenchRecord
from hayabusa.bench.roofline import DeviceRoofline, measure_roofline
from hayabusa.bench.runners import BenchRunner, EngineUnavailable, make_runner
from hayabusa.bench.serve_scenario import run_serve
from hayabusa.bench.structured_scenario import run_structured
from hayabusa.bench.tokenizer_scenario import run_tokenizer
from hayabusa.bench.workloads import SuiteSizes, workload_kv_blocks
from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.platform.machine_load import measure_machine_load

TOKENIZER_ENGINES = ("hayabusa", "transformers-eager")  # hayabusa.tokenizer and transformers' tokenizer
Case = tuple[str, str, Callable[[BenchRunner], BenchRecord]]  # (scenario, label, measure(runner))
BUSIEST_LISTED = 3  # processes a busy-machine warning names


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
    threads: int | None = None  # torch CPU threads for every engine (--threads); None: each engine's default
    jsonl: Path | None = None  # --jsonl: append every figure, skip, failure and kernel table here as it happens
    # --quantization: hayabusa's engines run once per entry, quantizing the checkpoint in that scheme while loading
    # (None: as stored); transformers' engines run the checkpoint as stored, once
    quantizations: tuple[str | None, ...] = (None,)


@dataclass
class SuiteResult:
    settings: SuiteSettings
    roofline: DeviceRoofline
    records: list[BenchRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # cannot run here: {engine, scenario, reason}
    errors: list[dict[str, str]] = field(default_factory=list)  # measurements that failed: {engine, scenario, error}
    launches_per_decode_step: dict[str, Any] = field(default_factory=dict)  # hayabusa's, counted (see launch_counts)
    decode_kernels: list[dict[str, Any]] = field(default_factory=list)  # hayabusa's per-kernel decode steps (CUDA)
    machine_load: dict[str, Any] = field(default_factory=dict)  # {"start": ..., "end": ...}; per case in records
    warnings: list[str] = field(default_factory=list)
    case_loads: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, load just before it)
    started: str = ""
    # (commit, where it was found) of the code as the run starts: a checkout edited while it runs is not what ran
    code_origin: tuple[str | None, str] = (None, "")
    seconds: float = 0.0

    def add_record(self, record: BenchRecord) -> None:
        self.records.append(record)
        self.emit("record", record.as_dict())

    def add_skip(self, engine: str, scenario: str, reason: str) -> None:
        self.skipped.append({"engine": engine, "scenario": scenario, "reason": reason})
        self.emit("skipped", self.skipped[-1])

    def add_error(self, engine: str, scenario: str, error: str) -> None:
        self.errors.append({"engine": engine, "scenario": scenario, "error": error})
        self.emit("error", self.errors[-1])

    def add_decode_kernels(self, table: dict[str, Any]) -> None:
        self.decode_kernels.append(table)
        self.emit("decode_kernels", table)

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        """One JSON line in --jsonl, written and closed at once: a run killed later keeps it."""
        if self.settings.jsonl is not None:
            with self.settings.jsonl.open("a", encoding="utf-8") as file:
                file.write(json.dumps({"event": event, **payload}, ensure_ascii=False) + "\n")

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        commit, commit_source = self.code_origin
        return {
            "schema_version": 1,
            "created": self.started,
            "seconds": self.seconds,
            "device": environment.device_description(s.device),
            "device_type": s.device.type,
            "driver": environment.driver_version(s.device),
            "commit": commit,
            "commit_source": commit_source,
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
            "decode_kernels": self.decode_kernels,
            "machine_load": self.machine_load,
            "torch_threads": s.threads or torch.get_num_threads(),
            "warnings": self.warnings,
        }


def run_suite(settings: SuiteSettings) -> SuiteResult:
    started = datetime.datetime.now(datetime.timezone.utc)
    code_origin = environment.code_origin()
    sizes = settings.sizes
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    run_threads = torch.get_num_threads()
    start_load = measure_machine_load()
    device_roofline = measure_roofline(settings.device, settings.dtype, sizes.roofline_copy_bytes,
                                       sizes.roofline_matmul_size)
    result = SuiteResult(settings, device_roofline, started=started.isoformat(timespec="seconds"),
                         code_origin=code_origin,
                         launches_per_decode_step=launch_counts(settings),
                         machine_load={"start": start_load.as_dict()})
    result.emit("run", {"device": environment.device_description(settings.device),
                         "dtype": str(settings.dtype).removeprefix("torch."), "sizes": settings.sizes.name,
                         "engines": list(settings.engines), "scenarios": list(settings.scenarios),
                         "roofline": device_roofline.as_dict()})
    if start_load.busy:
        result.warnings.append(busy_at_start_warning(start_load.as_dict()))
    cases = generation_cases(settings, device_roofline)
    tokenizer_engines = [e for e in settings.engines if e in TOKENIZER_ENGINES and "tokenizer" in settings.scenarios]
    serves = "serve" in settings.scenarios and "hayabusa" in settings.engines
    structured = "structured" in settings.scenarios and "hayabusa" in settings.engines
    runs = [(engine, quantize) for engine in settings.engines for quantize in engine_variants(engine, settings)]
    total = len(runs) * len(cases) + len(tokenizer_engines) + serves + structured
    with tqdm(total=total, desc="hayabusa bench", unit="case", dynamic_ncols=True) as progress:
        for engine, quantize in runs:
            torch.set_num_threads(run_threads)  # not the thread count the previous engine chose for itself
            if cases or profiles_kernels(engine, settings):
                _run_engine(engine, quantize, cases, settings, result, progress)
        for engine in tokenizer_engines:
            progress.set_postfix_str(f"{engine} tokenizer")
            _guarded(result, engine, "tokenizer", lambda e=engine: [
                result.add_record(record) for record in run_tokenizer(e, settings.model_dir, sizes)])
            progress.update(1)
        if serves:  # hayabusa's HTTP server in a process of its own, under locust
            progress.set_postfix_str("hayabusa serve")
            _guarded(result, "hayabusa", "serve", lambda: result.records.extend(run_serve(settings)))
            progress.update(1)
        if structured:  # the per-step cost of structured outputs' masks, on an engine of its own
            progress.set_postfix_str("hayabusa structured")
            _guarded(result, "hayabusa", "structured", lambda: result.records.extend(run_structured(settings)))
            progress.update(1)
    torch.set_num_threads(run_threads)
    disturbed = [(label, load) for label, load in result.case_loads if load["others_busy"]]
    if disturbed:
        result.warnings.append(disturbed_cases_warning(disturbed, total_cases=len(result.case_loads)))
    result.machine_load["end"] = measure_machine_load().as_dict()
    result.seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return result


def _busiest(load: dict[str, Any]) -> str:
    listed = ", ".join(f"{p['command'][:40]} ({p['cpu_pct']}%)" for p in load["busiest_processes"][:BUSIEST_LISTED])
    return f"; busiest: {listed}" if listed else ""


def busy_at_start_warning(load: dict[str, Any]) -> str:
    return (f"the machine was busy when the run started (load average {load['loadavg_1m']} on {load['cpus']} CPUs, "
            f"other processes using {load['other_busy_cpus']} CPUs{_busiest(load)}): its timings are noisy")


def disturbed_cases_warning(disturbed: list[tuple[str, dict[str, Any]]], total_cases: int) -> str:
    """One warning for all the cases that other processes held at least half the CPUs just before."""
    worst_label, worst = max(disturbed, key=lambda case: case[1]["other_busy_cpus"])
    return (f"other processes used at least half the {worst['cpus']} CPUs just before {len(disturbed)} of "
            f"{total_cases} cases (most: {worst['other_busy_cpus']} CPUs before {worst_label}{_busiest(worst)}): "
            "those timings are noisy (see the \"others' CPUs\" column of results.md)")


def launch_counts(settings: SuiteSettings) -> dict[str, Any]:
    """hayabusa's kernel launches per decode step at each decode batch, counted without running (PagedModel on meta
    tensors) with the configs of this GPU, or of an H200 when the run is on a CPU.

    The counter is a tool built on Triton's internals (it records launches instead of running them): it is imported
    only here, and where it breaks (another Triton) the run records why and goes on without the counts."""
    try:
        from hayabusa.engine.model.launches import decode_step_launches
        from hayabusa.kernels._launch import H200, device_limits

        on_gpu = settings.device.type == "cuda"
        limits = device_limits(settings.device) if on_gpu else H200
        counts = [decode_step_launches(settings.config, batch, dtype=settings.dtype, limits=limits).as_dict()
                  for batch in settings.sizes.decode_batches]
    except Exception as err:  # noqa: BLE001 - any failure of the tool only drops its counts
        return {"unavailable": f"the launch counter failed here: {type(err).__name__}: {err}"}
    return {"configs_of": "this device" if on_gpu else "H200 (simulated: 132 SMs)", "num_sms": limits.num_sms,
            "by_batch": counts}


def engine_variants(engine: str, settings: SuiteSettings) -> tuple[str | None, ...]:
    """The quantizations an engine runs: each of --quantization for hayabusa's, the checkpoint as stored for
    transformers' (with compressed-tensors decompressing a quantized one)."""
    return settings.quantizations if engine.startswith("hayabusa") else (None,)


def with_predictions(profile: dict[str, Any], settings: SuiteSettings, device_roofline: DeviceRoofline,
                     quantization: str | None) -> dict:
    """The profile with each kernel's predicted time beside its measured one (engine/model/decode_occupancy.py: bytes
    over this run's copy bandwidth plus a launch cost), for dense weights (quantized ones have no step table yet).
    A tool like the launch counter (it records launches on meta tensors): where it breaks, the profile says why and
    keeps its measurements."""
    if quantization is not None:
        return profile | {"vs_predicted": {"unavailable": f"predictions are for dense weights, not {quantization}"}}
    try:
        from hayabusa.bench.decode_occupancy import predicted_beside

        predicted = predicted_beside(profile, settings.config, settings.dtype, settings.device,
                                     device_roofline.copy_bytes_per_s)
    except Exception as err:  # noqa: BLE001 - any failure of the tool only drops its predictions
        predicted = {"unavailable": f"the predictions failed here: {type(err).__name__}: {err}"}
    return profile | {"vs_predicted": predicted}


def profiles_kernels(engine: str, settings: SuiteSettings) -> bool:
    """Whether this engine's run includes the per-kernel table of a decode step (hayabusa's Triton engine only)."""
    return engine == "hayabusa" and KERNEL_TABLE in settings.scenarios


def generation_cases(settings: SuiteSettings, device_roofline: DeviceRoofline) -> list[Case]:
    """(scenario, label, measure) for every generation case of the run, load first; a label names the case in
    the progress bar and in warnings ("decode batch 8")."""
    sizes, config, chosen = settings.sizes, settings.config, settings.scenarios
    cases: list[Case] = []
    if "load" in chosen:
        cases.append(("load", "load", lambda runner: scenarios.run_load(runner, sizes)))
    if "decode" in chosen:
        decode = partial(scenarios.run_decode, sizes=sizes, config=config, device_roofline=device_roofline)
        for batch, prompt_len in decode_cases(sizes):
            label = f"decode batch {batch}" + ("" if prompt_len == sizes.decode_prompt_len else f" prompt {prompt_len}")
            cases.append(("decode", label, partial(decode, batch=batch, prompt_len=prompt_len)))
    if "prefill" in chosen:
        cases += [("prefill", f"prefill prompt {n}", partial(scenarios.run_prefill, sizes=sizes, config=config,
                                                             device_roofline=device_roofline, prompt_len=n))
                  for n in sizes.prefill_prompt_lens]
    if "speculation" in chosen:
        cases.append(("speculation", "speculation prompt lookup", partial(scenarios.run_speculation, sizes=sizes)))
    if "throughput" in chosen:
        cases += [("throughput", f"throughput {case}",
                   partial(scenarios.run_throughput, sizes=sizes, case=case, sets=sets, gen_lens=gen_lens))
                  for case, sets, gen_lens in scenarios.throughput_workloads(sizes)]
    return cases


def _run_engine(engine: str, quantize: str | None, cases: list[Case], settings: SuiteSettings, result: SuiteResult,
                progress: tqdm) -> None:
    """One engine over every case: `quantize` (a quant_schemes name) quantizes the checkpoint while loading. Its
    skips and failures name it with the scheme ("hayabusa-reference W4A16")."""
    kv_blocks = workload_kv_blocks(settings.sizes) if settings.device.type == "cpu" else None
    label = engine + (f" {quantize}" if quantize else "")
    try:
        runner = make_runner(engine, settings.model_dir, settings.dtype, settings.device,
                             settings.sizes.static_batch, settings.engines_requested, kv_blocks, quantize)
    except EngineUnavailable as err:
        result.add_skip(label, "all", str(err))
        progress.update(len(cases))
        return
    except Exception as err:  # noqa: BLE001 - e.g. a torch without a setting the runner sets: skip, keep the run
        result.add_skip(label, "all", f"its runner could not be built here: {type(err).__name__}: {err}")
        progress.update(len(cases))
        return
    try:
        if not cases or cases[0][0] != "load":
            progress.set_postfix_str(f"{label} load")
            if not _guarded(result, label, "load", runner.load):
                progress.update(len(cases))
                return
        for done, (scenario, case_label, measure) in enumerate(cases):
            progress.set_postfix_str(f"{label} {case_label}")
            load = measure_machine_load().as_dict()
            result.case_loads.append((f"{label} {case_label}", load))
            ok = _guarded(result, label, scenario, lambda m=measure, case_load=load: result.add_record(
                _with_case_facts(m(runner), case_load, runner.record_facts(), runner.quantization)))
            progress.update(1)
            if not ok and scenario == "load":  # nothing else can run without the model
                progress.update(len(cases) - done - 1)
                return
        if profiles_kernels(engine, settings):
            progress.set_postfix_str(f"{label} decode kernels")
            _guarded(result, label, KERNEL_TABLE, lambda: [
                result.add_decode_kernels({**with_predictions(decode_step_kernels(runner, batch, prompt_len), settings,
                                                              result.roofline, runner.quantization),
                                           "quantization": runner.quantization})
                for batch, prompt_len in decode_cases(settings.sizes)])
    finally:
        runner.unload()


def _with_case_facts(record: BenchRecord, load: dict[str, Any], runner_facts: dict[str, Any],
                     quantization: str | None) -> BenchRecord:
    """The record with the torch threads it ran with, the machine's load just before it, the runner's settings
    and its quantized weights."""
    record.extra |= {**runner_facts, "torch_threads": torch.get_num_threads(),
                     "machine_load": {key: load[key] for key in ("loadavg_1m", "other_busy_cpus", "others_busy")}}
    record.quantization = quantization
    return record


def decode_cases(sizes: SuiteSizes) -> list[tuple[int, int]]:
    """(batch, prompt_len) of every decode case; the per-kernel table profiles one step of each."""
    cases = [(batch, sizes.decode_prompt_len) for batch in sizes.decode_batches]
    return cases + ([(1, sizes.long_decode_prompt_len)] if sizes.long_decode_prompt_len else [])


def _guarded(result: SuiteResult, engine: str, scenario: str, fn: Callable[[], object]) -> bool:
    """Run one measurement; a failure is recorded (and printed) instead of ending the whole suite."""
    try:
        fn()
        return True
    except EngineUnavailable as err:
        result.add_skip(engine, scenario, str(err))
    except Exception as err:  # noqa: BLE001 - any engine failure must be reported, not hide the other engines
        result.add_error(engine, scenario, f"{type(err).__name__}: {err}")
        tqdm.write(f"[{engine} {scenario}] failed:\n{traceback.format_exc()}")
    if torch.cuda.is_available():  # e.g. after an out-of-memory error, before the next case allocates
        torch.cuda.empty_cache()
    return False
