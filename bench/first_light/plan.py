"""The first light's stages, in the order their numbers are worth, for a GPU run and for the CPU smoke run.

Every stage shares one work directory: one random checkpoint, one Triton cache (the warm start compiles every kernel
the engine launches into it once; every later stage reads it), one Hugging Face home, all offline. The bench stages
append each figure to the run's JSON lines as it is measured (`hayabusa bench --jsonl`).

Shares (cap_s) on a GPU are guesses for one H100 or H200 until a run measures them; each stage's outcome records
its seconds, so the first run's JSON lines say how to set them. Their sum plus the finish reserve fits 540 s.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .figures import bench_figures, last_json, pytest_outcomes, sanitizer_findings, verify_checks
from .runner import Stage

RESERVE_S = 15.0  # kept after the last stage: merge the bench results, write the summary, close the bundle
STAGE_ORDER = ("preflight", "install", "checkpoint", "warm-start", "verify-fp16", "hayabusa", "transformers-eager",
               "quantized", "kernel-profile", "kernel-tests", "memcheck", "transformers-compile")
# Kernel tests by what they guard: the decode path first. Not the sm_90 compile check (a tool that recompiles every
# kernel: minutes) nor the interpreter's own memcheck tests.
KERNEL_TESTS = ("test_gemv.py", "test_decode_attention.py", "test_linear.py", "test_prefill_attention.py",
                "test_layernorm.py", "test_mlp.py", "test_rotary.py", "test_in_launch_reductions.py",
                "test_reference_gemm.py")
SANITIZER_PLACES = ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda-*/bin/compute-sanitizer",
                    "/opt/nvidia/*/compute-sanitizer/compute-sanitizer")


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    preset: str  # the random checkpoint's shape
    run_dtype: str  # what the warm start loads in (the bench's default on the device)
    backend: str  # the warm start's engine backend
    sizes: str  # hayabusa bench --sizes
    engine: str  # the hayabusa engine the bench stages time
    cases: str  # what the --sizes preset decodes and prefills
    quantizations: tuple[str, ...]  # the quantized stage's --quantization schemes (quantized while loading)
    verify_args: tuple[str, ...]
    kernel_tests: tuple[str, ...]
    caps: dict[str, float]  # seconds per stage
    cpu_only: dict[str, str]  # stages this mode cannot run, with the reason


GPU = Mode(
    name="gpu", device="cuda", preset="2.7b", run_dtype="float16", backend="triton", sizes="gpu", engine="hayabusa",
    cases="decode at batch 1/8/64 and at batch 1 after 1920 tokens, then prefill 2048", quantizations=("int8", "int4"),
    verify_args=(),
    kernel_tests=KERNEL_TESTS,
    # warm start: ~45 kernel specializations compiled one after another (engine_specializations); eager: four
    # decode cases of 4 x 128 steps at ~20 ms; quantized: two loads quantizing 128 linears on the GPU and the
    # quantized kernels' own compiles; compile: one compile and CUDA-graph capture of the 2.7B decode step
    caps={"preflight": 15, "install": 20, "checkpoint": 30, "warm-start": 125, "verify-fp16": 35, "hayabusa": 50,
          "transformers-eager": 80, "quantized": 40, "kernel-profile": 25, "kernel-tests": 25, "memcheck": 20,
          "transformers-compile": 60},
    cpu_only={})
# The same control flow on a CPU with the tiny model: the reference engine, smoke sizes, one kernel test file;
# shares about twice what each stage took on a 2-core machine.
CPU_SMOKE = Mode(
    name="cpu-smoke", device="cpu", preset="tiny", run_dtype="float32", backend="reference", sizes="smoke",
    engine="hayabusa-reference", cases="smoke sizes: decode at batch 1/4, prefill 16/32",
    quantizations=("int8",),  # tiny's 160 columns are no whole number of int4's groups of 128
    verify_args=("--ops", "torch", "--steps", "4"), kernel_tests=("test_rotary.py",),
    caps={"preflight": 10, "install": 10, "checkpoint": 15, "warm-start": 15, "verify-fp16": 25, "hayabusa": 35,
          "transformers-eager": 55, "quantized": 25, "kernel-profile": 10, "kernel-tests": 45, "memcheck": 10,
          "transformers-compile": 10},
    cpu_only={"kernel-profile": "the per-kernel table times CUDA kernels: a GPU run's stage",
              "memcheck": "compute-sanitizer checks CUDA kernels: a GPU run's stage",
              "transformers-compile": "torch.compile of even the tiny model takes minutes on a small CPU: a GPU "
                                      "run's stage"})
MODES = {mode.name: mode for mode in (GPU, CPU_SMOKE)}

FAIL_SCRIPT = "import sys; print('first light: --fail made this stage fail', flush=True); sys.exit(3)"
# Ignores SIGTERM and leaves a child behind (it prints its pid): only the SIGKILL of the whole group ends both.
OVERRUN_SCRIPT = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
                  "print(f'first light: --overrun made this stage run past its limit; child pid {child.pid}', "
                  "flush=True); time.sleep(3600)")


def find_compute_sanitizer() -> str | None:
    """Where compute-sanitizer is: on PATH or in the CUDA toolkit's usual places; None when not found."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    return next((path for pattern in SANITIZER_PLACES for path in sorted(glob.glob(pattern))
                 if os.access(path, os.X_OK)), None)


def build_plan(mode: Mode, *, python: str, repo: Path, work: Path, jsonl: Path,
               sanitizer: str | None) -> list[Stage]:
    """The stages of one run, in STAGE_ORDER."""
    model = work / f"model-{mode.preset}"
    py = (python,)
    bench = (*py, "-m", "hayabusa", "bench", "--model", str(model), "--device", mode.device, "--sizes", mode.sizes,
             "--jsonl", str(jsonl))

    def bench_stage(name: str, what: str, *args: str, env: dict[str, str] | None = None) -> Stage:
        out = work / f"bench-{name}"
        return Stage(name, mode.caps[name], (*bench, *args, "--out", str(out)), what,
                     needs=("checkpoint",), env=env or {}, figures=_reading(bench_figures, out), artifacts=(out,))

    pytest = (*py, "-m", "pytest", "-v", "-p", "no:cacheprovider", *(f"tests/kernels/{f}" for f in mode.kernel_tests))
    stages = [
        Stage("preflight", mode.caps["preflight"],
              (*py, str(Path(__file__).with_name("probe.py")), "--device", mode.device, "--work", str(work)),
              "versions, device, SMs, free memory and disk", figures=last_json),
        Stage("install", mode.caps["install"],
              (*py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(repo))
              if mode.device == "cuda" else (*py, "-m", "hayabusa", "--version"),
              "this checkout, on the machine's own torch, triton and transformers" if mode.device == "cuda"
              else "the hayabusa installed here (the smoke run does not reinstall it)", needs=("preflight",)),
        Stage("checkpoint", mode.caps["checkpoint"],
              (*py, "-m", "hayabusa", "init-random", str(model), "--preset", mode.preset, "--dtype", "float16",
               "--quiet"),
              f"random {mode.preset} weights, float16", needs=("install",),
              figures=lambda _: {"checkpoint_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))}),
        Stage("warm-start", mode.caps["warm-start"],
              (*py, "-m", "hayabusa.bench.start_time", "--model", str(model), "--dtype", mode.run_dtype,
               "--device", mode.device, "--backend", mode.backend),
              "Engine.from_pretrained on an empty Triton cache: compiles every kernel once, for every later stage",
              needs=("checkpoint",), figures=lambda log: {"cold_start_ms": last_json(log).get("ms")}),
        Stage("verify-fp16", mode.caps["verify-fp16"],
              (*py, "-m", "hayabusa", "verify", "--model", str(model), "--device", mode.device, "--dtype", "float16",
               *mode.verify_args),
              "the kernel path against the float32 reference, float16", needs=("checkpoint",), figures=verify_checks),
        bench_stage("hayabusa", mode.cases, "--engines", mode.engine, "--scenarios", "decode", "prefill"),
        bench_stage("transformers-eager", "the same cases on transformers' generate(), eager",
                    "--engines", "transformers-eager", "--scenarios", "decode", "prefill"),
        bench_stage("quantized", f"{' and '.join(mode.quantizations)} weights quantized while loading (issue 18), "
                    "decode at batch 1", "--engines", mode.engine, "--scenarios", "decode", "--decode-batches", "1",
                    "--long-decode-prompt", "0", "--quantization", *mode.quantizations),
        replace(bench_stage("kernel-profile", "one decode step per decode case, kernel by kernel (torch.profiler)",
                            "--engines", "hayabusa", "--scenarios", "kernels"),
                unavailable=mode.cpu_only.get("kernel-profile")),
        # Aligned guard bands first: the kernel variants the engine runs (16-byte loads), at the 2.7B shapes; then
        # the misaligned (scalar-load) variants, as far as the stage's time goes (tests/kernels/conftest.py).
        Stage("kernel-tests", mode.caps["kernel-tests"], pytest,
              "kernel tests at full shapes, the engine's aligned variants first, decode path first"
              if mode.device == "cuda" else "a kernel test file under the Triton interpreter",
              needs=("install",),
              env={"HAYABUSA_KERNEL_SHAPES": "full", "HAYABUSA_GUARD_ALIGNMENT": "both"} if mode.device == "cuda"
              else {}, open_ended=True, figures=pytest_outcomes),
        Stage("memcheck", mode.caps["memcheck"],  # skipped where compute-sanitizer is not found (runner.py)
              (sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20",
               *pytest),
              "kernel tests at small shapes under compute-sanitizer memcheck", needs=("install",),
              # no caching allocator: an access past a tensor then lands outside any allocation, where memcheck sees it
              env={"HAYABUSA_KERNEL_SHAPES": "small", "HAYABUSA_GUARD_ALIGNMENT": "aligned",
                   "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, open_ended=True,
              unavailable=mode.cpu_only.get("memcheck"),
              figures=lambda log: {**pytest_outcomes(log), **sanitizer_findings(log)}),
        # One case, so one compile: every (batch, cache length) is a new static shape to compile and capture.
        replace(bench_stage("transformers-compile", "static cache + torch.compile, decode at batch 1 only",
                            "--engines", "transformers-compile", "--scenarios", "decode", "--decode-batches", "1",
                            "--long-decode-prompt", "0"),
                unavailable=mode.cpu_only.get("transformers-compile")),
    ]
    if mode.device == "cuda":  # every stage needs the GPU the preflight found
        stages = [replace(s, needs=tuple(dict.fromkeys(("preflight", *s.needs)))) if s.name != "preflight" else s
                  for s in stages]
    assert tuple(s.name for s in stages) == STAGE_ORDER
    return stages


def with_faults(stages: list[Stage], python: str, fail: list[str], overrun: list[str]) -> list[Stage]:
    """The plan with the named stages made to fail at once or to run past their limit (proving the runner)."""
    unknown = [name for name in (*fail, *overrun) if name not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(STAGE_ORDER)}")
    return [replace(s, command=(python, "-c", FAIL_SCRIPT), unavailable=None) if s.name in fail
            else replace(s, command=(python, "-c", OVERRUN_SCRIPT), unavailable=None) if s.name in overrun
            else s for s in stages]


def _reading(read: Callable[[Path], dict], out: Path) -> Callable[[str], dict]:
    """A figure reader for a stage whose figures are in a directory it writes, not in its log."""
    return lambda _log: read(out)
