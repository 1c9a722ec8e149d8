"""Compile every Triton kernel specialization the engine launches for the 2.7B model on an H200 (sm_90), no GPU.

The set is `engine_specializations` (engine/model/launches.py): PagedModel's decode at every batch bucket up to 256 and
every block-table width, and its prefill at every token-count bucket up to 2048, run on meta tensors under
`simulated_device(H200)` (132 SMs, 227 KB of shared memory per block) with each launch recorded instead of run.
Triton's own binder specializes each recorded launch as a real launch would, and `triton.compile` builds it for
sm_90 with a fresh cache, so ptxas reports registers and spills. fp16 and bf16 get every bucket; fp32 (the exactness
path) decode at batch 1 and prefill at 1 and 2048 tokens, to stay in the time budget. `quantized_launches` adds
the linear layers on int8 / int4 weights (issue 18's presets) at the decode GEMV buckets and a prefill.
Prints one row per distinct compiled kernel; exits 1 when one fails to compile or needs more shared memory than a
block may use, 77 when this machine cannot compile for CUDA.

    python -m hayabusa.bench.sm90_compile_check [--json results.json] [--jobs N]

Run it without TRITON_INTERPRET (which turns @triton.jit kernels into interpreted functions).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.model.launches import engine_specializations
from hayabusa.kernels._launch import H200

SM90 = GPUTarget("cuda", 90, 32)
SKIP_EXIT_CODE = 77
MAX_NUM_SEQS = 256  # decode batches (CUDA-graph sizes) up to this
MAX_PREFILL_TOKENS = 2048  # a full-context prefill
FP32_TOKEN_COUNTS = [1, 2048]  # fp32's decode and prefill regimes
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Launch:
    label: str  # the forward pass that makes it, e.g. "decode batch 1 blocks 128 fp16"
    kernel: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class CompileResult:
    label: str  # the first launch that compiles to this kernel
    same_kernel: list[str]  # the other launches that compile to exactly the same kernel
    kernel: str
    config: str  # the constexprs and launch options that shape the code
    ok: bool
    error: str = ""
    registers: int = -1
    spill_stores: int = -1  # bytes, from ptxas -v
    spill_loads: int = -1
    shared: int = -1  # bytes of shared memory per block (Triton's dynamic allocation)
    grid_dependency: list[str] = field(default_factory=list)  # griddepcontrol instructions in the PTX (PDL)
    seconds: float = 0.0


def engine_launches() -> list[Launch]:
    """One recorded launch per kernel specialization of the engine's 2.7B forward passes, on meta tensors."""

    launches = []
    for dtype, dtype_name in DTYPES.items():
        fp32 = dtype == torch.float32
        specializations = engine_specializations(
            PRESETS["2.7b"], dtype, limits=H200, max_num_seqs=1 if fp32 else MAX_NUM_SEQS,
            max_num_batched_tokens=MAX_PREFILL_TOKENS, token_counts=FP32_TOKEN_COUNTS if fp32 else None)
        launches += [Launch(f"{spec.example} {dtype_name}", spec.launch.kernel, spec.launch.args, spec.launch.kwargs)
                     for spec in specializations]
    return launches


# Quantized weights (QuantizedWeight: bits, group_size, symmetric), the presets of issue 18, on the 2.7B model's
# projections: the decode GEMV at every M bucket and the tile GEMM at a full prefill.
QUANTIZED_SCHEMES = {"int8-channel": (8, None, True), "int8-g128": (8, 128, True), "int4-g128": (4, 128, True),
                     "int4-g128-asym": (4, 128, False)}
# fp16 at every GEMV bucket and the prefill; bf16 (the same code but for x's conversions) at decode batch 1, to stay
# in the time budget (a run with bf16 at M = 2, 4, 16, 2048 and fp16 at 16 as well compiled all 200 without spills)
QUANTIZED_TOKEN_COUNTS = {torch.float16: [1, 2, 4, 2048], torch.bfloat16: [1]}


def quantized_launches() -> list[Launch]:
    """One recorded launch per kernel specialization of `linear` / `ln_linear` on a QuantizedWeight, for each
    preset and dtype, as the engine's layers would call them (meta tensors, H200 configs)."""
    from hayabusa.kernels._launch import simulated_device
    from hayabusa.kernels.launch_count import recorded_launches
    from hayabusa.kernels.linear import linear, ln_linear
    from hayabusa.kernels.quantized_weight import QuantizedWeight, code_columns

    config = PRESETS["2.7b"]
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    # (name, N, K, LayerNorm fused, bias, activation, residual), as engine/fast_model.py calls them
    projections = [("qkv", 3 * hidden, hidden, True, False, None, False),
                   ("dense", hidden, hidden, False, True, None, True),
                   ("dense-no-bias", hidden, hidden, False, False, None, True),
                   ("mlp-in", inter, hidden, True, False, "gelu", False),
                   ("mlp-out", hidden, inter, False, False, None, True),
                   ("lm-head", vocab, hidden, True, False, None, False)]
    meta = torch.device("meta")
    launches = []
    for scheme, (bits, group_size, symmetric) in QUANTIZED_SCHEMES.items():
        for dtype, token_counts in QUANTIZED_TOKEN_COUNTS.items():
            for tokens in token_counts:
                for name, N, K, has_ln, has_bias, activation, has_residual in projections:
                    groups = 1 if group_size is None else K // group_size
                    weight = QuantizedWeight(
                        torch.empty(N, code_columns(bits, K), dtype=torch.uint8, device=meta),
                        torch.empty(N, groups, dtype=dtype, device=meta),
                        None if symmetric else torch.empty(N, groups, dtype=torch.uint8, device=meta),
                        bits, group_size, K)
                    x = torch.empty(tokens, K, dtype=dtype, device=meta)
                    vector = torch.empty(K, dtype=dtype, device=meta)
                    epilogue = dict(bias=torch.empty(N, dtype=dtype, device=meta) if has_bias else None,
                                    residual=torch.empty(tokens, N, dtype=dtype, device=meta) if has_residual
                                    else None, activation=activation)
                    with simulated_device(H200), recorded_launches() as log:
                        if has_ln:
                            ln_linear(x, vector, vector, 1e-5, weight, **epilogue)
                        else:
                            linear(x, weight, **epilogue)
                    launches += [Launch(f"{scheme} {name} M={tokens} {DTYPES[dtype]}", launch.kernel, launch.args,
                                        launch.kwargs) for launch in log.triton]
    return launches


def specialize(launch: Launch) -> tuple[ASTSource, dict, str]:
    """(source, options, config summary) exactly as JITFunction.run would build them on an sm_90 device."""
    backend = make_backend(SM90)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound_args,
                                                                      specialization, options)
    names = launch.kernel.arg_names
    shown = {names[path[0]]: value for path, value in constexprs.items() if names[path[0]].isupper()}
    shown.update(num_warps=options.num_warps, num_stages=options.num_stages)
    config = " ".join(f"{name}={value}" for name, value in shown.items())
    return ASTSource(launch.kernel, signature, constexprs, attrs), options.__dict__, config


def compile_key(launch: Launch) -> str:
    source, options, _ = specialize(launch)
    return f"{source.hash()}-{sorted(options.items())}"


_launches: list[Launch] = []  # set before the worker processes fork


def compile_one(index: int) -> CompileResult:
    launch = _launches[index]
    source, options, config = specialize(launch)
    result = CompileResult(launch.label, [], launch.kernel.__name__, config, ok=False)
    start = time.perf_counter()
    ptxas_log = io.StringIO()
    try:
        with contextlib.redirect_stdout(ptxas_log):  # Triton prints ptxas -v output with dump_ptxas_log
            compiled = triton.compile(source, target=SM90, options=options)
    except Exception as error:  # noqa: BLE001 - any compiler failure is this kernel's result
        result.error = f"{type(error).__name__}: {error}"[:2000]
        return result
    result.seconds = time.perf_counter() - start
    registers = re.search(r"Used (\d+) registers", ptxas_log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log.getvalue())
    if registers is None or spills is None:
        result.error = f"no ptxas -v report in the compiler's output: {ptxas_log.getvalue()[-500:]!r}"
        return result
    result.registers = int(registers.group(1))
    result.spill_stores, result.spill_loads = int(spills.group(1)), int(spills.group(2))
    result.shared = compiled.metadata.shared
    result.grid_dependency = sorted(set(re.findall(r"griddepcontrol\.\w+", compiled.asm["ptx"])))
    result.ok = result.shared <= H200.shared_memory_bytes
    if not result.ok:
        result.error = f"needs {result.shared} bytes of shared memory, the H200 allows {H200.shared_memory_bytes}"
    return result


def cuda_compiler_missing() -> str | None:
    """Why this machine cannot compile Triton kernels for CUDA, or None when it can."""
    if triton.knobs.runtime.interpret:
        return "TRITON_INTERPRET is set: @triton.jit kernels are interpreted functions and cannot be compiled"
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        get_ptxas_version(SM90.arch)
    except Exception as error:  # noqa: BLE001 - a missing backend or ptxas shows up in many forms
        return f"Triton's CUDA backend or its ptxas is unusable here: {type(error).__name__}: {error}"
    return None


def format_table(results: list[CompileResult]) -> str:
    """One row per compiled kernel; "(+n)": n more launches compile to exactly this kernel."""
    rows = [f"{'launch':<40} {'kernel':<25} {'regs':>4} {'spill st/ld':>11} {'shared':>6} {'s':>4}  config"]
    for r in results:
        label = r.label + (f" (+{len(r.same_kernel)})" if r.same_kernel else "")
        rows.append(f"{label:<40} {r.kernel:<25} {r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':>11} "
                    f"{r.shared:>6} {r.seconds:>4.1f}  {r.config}" + ("" if r.ok else f"\n    FAILED: {r.error}"))
    return "\n".join(rows)


def compile_distinct(launches: list[Launch], jobs: int) -> list[CompileResult]:
    """Compile each distinct kernel among `launches` once for sm_90, in a fresh Triton cache (so every kernel really
    goes through ptxas, whose -v report gives registers and spills), `jobs` at a time. One result per distinct kernel,
    in first-seen order; its same_kernel names the other launches that compile to exactly that kernel."""
    launches_of_key: dict[str, list[int]] = {}
    for index, launch in enumerate(launches):
        launches_of_key.setdefault(compile_key(launch), []).append(index)
    cache_dir, dump_log = triton.knobs.cache.dir, triton.knobs.nvidia.dump_ptxas_log
    with tempfile.TemporaryDirectory(prefix="hayabusa-sm90-") as fresh:
        triton.knobs.cache.dir = fresh
        triton.knobs.nvidia.dump_ptxas_log = True
        _launches[:] = launches
        try:
            with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
                results = pool.map(compile_one, [indices[0] for indices in launches_of_key.values()], chunksize=1)
        finally:
            triton.knobs.cache.dir, triton.knobs.nvidia.dump_ptxas_log = cache_dir, dump_log
    for result, indices in zip(results, launches_of_key.values(), strict=True):
        result.same_kernel = [launches[index].label for index in indices[1:]]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compiles")
    args = parser.parse_args()
    reason = cuda_compiler_missing()
    if reason is not None:
        print(f"skip: {reason}")
        return SKIP_EXIT_CODE

    launches = engine_launches() + quantized_launches()
    start = time.perf_counter()
    results = compile_distinct(launches, args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} distinct kernels from {len(launches)} launches compiled for sm_90 in "
          f"{time.perf_counter() - start:.1f} s: {len(failed)} failed, "
          f"{sum(r.spill_stores > 0 for r in results)} spill registers")
    if args.json:
        with open(args.json, "w") as file:
            json.dump([asdict(r) for r in results], file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
