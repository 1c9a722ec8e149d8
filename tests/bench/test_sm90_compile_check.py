"""Every kernel specialization the engine launches for the 2.7B model compiles for an H200 (sm_90), with no GPU, and
the decode path and the prefill GEMMs spill no registers.

The interpreter that runs the other kernel tests on CPU never compiles anything, so it misses GPU-only failures
(dot tile minimums, shared memory overflowing from the pipeline depth, unsupported dtype mixes). The checker runs
in a subprocess without TRITON_INTERPRET, which conftest sets on machines with no GPU.
"""

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
from triton.runtime.jit import KernelInterface

from hayabusa.bench.sm90_compile_check import SKIP_EXIT_CODE
from hayabusa.kernels._launch import H200

# by module path: hayabusa.kernels re-exports functions under some of these names
KERNEL_MODULES = [importlib.import_module(f"hayabusa.kernels.{name}")
                  for name in ("gemv", "linear", "layernorm", "decode_attention", "prefill_attention",
                               "gemv_quantized", "linear_quantized")]
# Prefill attention is neither decode nor a GEMM: its fp32 variant (the exactness path) spills 32 bytes at 64x32 tiles.
MAY_SPILL = {"_prefill_attention_kernel"}


def test_every_kernel_compiles_for_sm90_within_shared_memory(tmp_path):
    results_path = tmp_path / "sm90.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "hayabusa.bench.sm90_compile_check", "--json", str(results_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    print(run.stdout)  # the register / spill / shared-memory table, shown with -s or on failure
    if run.returncode == SKIP_EXIT_CODE:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, f"sm_90 compile check failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"

    results = json.loads(results_path.read_text())
    failed = [(r["label"], r["error"]) for r in results if not r["ok"]]
    assert not failed, failed
    for r in results:
        assert 0 <= r["shared"] <= H200.shared_memory_bytes, (r["label"], r["shared"])
        assert 0 < r["registers"] <= 255, (r["label"], r["registers"])
        if r["kernel"] not in MAY_SPILL:
            assert r["spill_stores"] == r["spill_loads"] == 0, (r["label"], r["config"], r["spill_stores"])
    # Every kernel the package defines was launched by some engine call, so none escapes the check.
    defined = {name for module in KERNEL_MODULES for name, value in inspect.getmembers(module)
               if isinstance(value, KernelInterface) and name.endswith("_kernel")}
    assert defined == {r["kernel"] for r in results}
    configs = " | ".join(r["config"] for r in results)
    assert "NUM_SPLITS=1 " in configs and "NUM_SPLITS=16 " in configs  # decode with and without split-K
    assert "SPLIT_K=4 " in configs and "SPLIT_K=2 " in configs and "SPLIT_K=1 " in configs  # linear, gemv split-K
    assert "BLOCK_M=128 BLOCK_N=128 " in configs  # the prefill tile
