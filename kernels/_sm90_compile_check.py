"""Compile every Triton kernel for an H100 (sm_90) at the launch configurations the engine uses for the 2.7B model.

No GPU needed: the launchers run on meta tensors with Triton's launch replaced by a recorder, so each kernel gets
exactly the arguments, constexprs, num_warps and num_stages its launcher picks (configs from `choose_config`,
`attention_config`, `pick_num_splits` with the H100's 132 SMs and 227 KB of shared memory per block). Triton's own
binder specializes each recorded launch as a real launch would, and `triton.compile` builds it for sm_90 with a
fresh cache, so ptxas reports registers and spills. Prints one row per distinct compiled kernel; exits 1 when one
fails to compile or needs more shared memory than a block may use, 77 when this machine cannot compile for CUDA.

    python -m hayabusa.kernels._sm90_compile_check [--json results.json] [--jobs N]

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from hayabusa.engine.config import PRESETS
from hayabusa.kernels.decode_attention import launch_decode_attention, pick_num_splits
from hayabusa.kernels.layernorm import launch_layer_norm
from hayabusa.kernels.linear import choose_config, launch_linear
from hayabusa.kernels.prefill_attention import launch_prefill_attention

SM90 = GPUTarget("cuda", 90, 32)
H100_SMS = 132
H100_SHARED_MEMORY = 232448  # opt-in shared memory per block: 227 KB
SKIP_EXIT_CODE = 77

GEMM_TOKENS = (1, 8, 32, 128, 256, 2048)  # decode batches (CUDA-graph sizes) and a full 2048-token prefill
FP32_GEMM_TOKENS = (1, 2048)  # fp32 is the exactness path: its decode and prefill regimes, to stay in the time budget
DECODE_BATCHES = (1, 8, 32, 256)  # 1 and 8 take the split-K kernel at 2048-token contexts, 32+ the single pass
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_SIZE = 16  # the engine's KV-cache page
MAX_CONTEXT = 2048


@dataclass(frozen=True)
class Launch:
    label: str  # the engine call that makes it, e.g. "linear mlp_in M=8 fp16"
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
    seconds: float = 0.0


@contextlib.contextmanager
def recorded_launches(label: str, into: list[Launch]) -> Iterator[None]:
    """While active, `kernel[grid](...)` appends a Launch to `into` instead of running."""
    real_run = JITFunction.run

    def record(kernel: JITFunction, *args, grid, warmup, **kwargs):
        into.append(Launch(label, kernel, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real_run


def engine_launches() -> list[Launch]:
    """Every kernel launch of the engine's 2.7B forward passes at the sizes above, on meta tensors."""
    cfg = PRESETS["2.7b"]
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    meta = torch.device("meta")
    launches: list[Launch] = []
    # (name, N, K, bias, residual, activation) as FastModel calls `linear` and `fused_mlp` does
    gemms = [("qkv", 3 * hidden, hidden, False, False, None), ("dense", hidden, hidden, False, True, None),
             ("dense+bias", hidden, hidden, True, True, None), ("mlp_in", inter, hidden, False, False, "gelu"),
             ("mlp_out", hidden, inter, False, True, None), ("embed_out", vocab, hidden, False, False, None)]
    max_blocks = MAX_CONTEXT // BLOCK_SIZE
    for dtype, dtype_name in DTYPES.items():
        def empty(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=meta)

        for name, N, K, has_bias, has_residual, activation in gemms:
            for M in FP32_GEMM_TOKENS if dtype == torch.float32 else GEMM_TOKENS:
                config = choose_config(M, N, K, dtype.itemsize, H100_SMS, H100_SHARED_MEMORY)
                with recorded_launches(f"linear {name} M={M} {dtype_name}", launches):
                    launch_linear(config, empty(M, K), empty(N, K), empty(N) if has_bias else None,
                                  empty(M, N) if has_residual else None, activation, empty(M, N))

        for M in (1, 2048):
            with recorded_launches(f"layer_norm M={M} {dtype_name}", launches):
                launch_layer_norm(empty(M, hidden), None, empty(hidden), empty(hidden), cfg.layer_norm_eps,
                                  empty(M, hidden), None)
            with recorded_launches(f"add_layer_norm M={M} {dtype_name}", launches):
                launch_layer_norm(empty(M, hidden), empty(M, hidden), empty(hidden), empty(hidden),
                                  cfg.layer_norm_eps, empty(M, hidden), empty(M, hidden))

        rotary = [empty(cfg.max_position_embeddings, cfg.rotary_dims // 2, dtype=torch.float32) for _ in range(2)]
        for batch in DECODE_BATCHES:
            num_splits = pick_num_splits(batch, heads, max_blocks * BLOCK_SIZE, H100_SMS)
            cache = [empty(batch * max_blocks, BLOCK_SIZE, heads, head_dim) for _ in range(2)]
            with recorded_launches(f"decode B={batch} splits={num_splits} {dtype_name}", launches):
                launch_decode_attention(empty(batch, 3 * hidden), empty(batch, dtype=torch.int32),
                                        empty(batch, max_blocks, dtype=torch.int32), *cache, *rotary,
                                        cfg.rotary_dims, num_splits)

        for num_seqs, new_tokens in ((1, MAX_CONTEXT), (8, 256)):
            cache = [empty(num_seqs * max_blocks, BLOCK_SIZE, heads, head_dim) for _ in range(2)]
            with recorded_launches(f"prefill {num_seqs}x{new_tokens} {dtype_name}", launches):
                launch_prefill_attention(empty(num_seqs * new_tokens, 3 * hidden),
                                         empty(num_seqs + 1, dtype=torch.int32), empty(num_seqs, dtype=torch.int32),
                                         empty(num_seqs, max_blocks, dtype=torch.int32), *cache, *rotary,
                                         cfg.rotary_dims, new_tokens)
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
    result.ok = result.shared <= H100_SHARED_MEMORY
    if not result.ok:
        result.error = f"needs {result.shared} bytes of shared memory, the H100 allows {H100_SHARED_MEMORY}"
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
    rows = [f"{'launch':<30} {'kernel':<25} {'regs':>4} {'spill st/ld':>11} {'shared':>6} {'s':>4}  config"]
    for r in results:
        label = r.label + (f" (+{len(r.same_kernel)})" if r.same_kernel else "")
        rows.append(f"{label:<30} {r.kernel:<25} {r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':>11} "
                    f"{r.shared:>6} {r.seconds:>4.1f}  {r.config}" + ("" if r.ok else f"\n    FAILED: {r.error}"))
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compiles")
    args = parser.parse_args()
    reason = cuda_compiler_missing()
    if reason is not None:
        print(f"skip: {reason}")
        return SKIP_EXIT_CODE

    # A fresh cache, so every kernel really goes through ptxas (whose -v report gives registers and spills).
    cache_dir = tempfile.TemporaryDirectory(prefix="hayabusa-sm90-")
    triton.knobs.cache.dir = cache_dir.name
    triton.knobs.nvidia.dump_ptxas_log = True
    launches = engine_launches()
    launches_of_key: dict[str, list[int]] = {}
    for index, launch in enumerate(launches):
        launches_of_key.setdefault(compile_key(launch), []).append(index)
    _launches[:] = launches
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        results = pool.map(compile_one, [indices[0] for indices in launches_of_key.values()], chunksize=1)
    cache_dir.cleanup()
    for result, indices in zip(results, launches_of_key.values(), strict=True):
        result.same_kernel = [launches[index].label for index in indices[1:]]

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
