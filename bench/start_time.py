"""Cold and warm start of hayabusa's Engine: `from_pretrained` (checkpoint load + warm-up of every kernel shape) in a
fresh process, first with an empty Triton cache (every kernel compiles), then with the cache that run filled.

`python -m hayabusa.bench.start_time --model DIR --dtype float16 --device cuda --backend triton` times one start
in its own process and prints {"ms": ...}; `measure_starts` runs it twice on a fresh TRITON_CACHE_DIR. A
process of its own each time, because a process that compiled a kernel keeps it in memory whatever the disk
cache holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hayabusa.engine.loading.config import DTYPES


def time_start(model: str, dtype: torch.dtype, device: torch.device, backend: str,
               quantization: str | None = None) -> float:
    """ms for Engine.from_pretrained to return a ready engine (warm-up included, device work finished)."""
    from hayabusa.engine.api import Engine

    start = time.perf_counter()
    engine = Engine.from_pretrained(model, dtype=dtype, device=device, backend=backend, quantization=quantization)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    engine.close()
    return elapsed_ms


def measure_starts(model_dir: Path, dtype: torch.dtype, device: torch.device, backend: str,
                   quantization: str | None = None) -> tuple[float, float]:
    """(cold ms, warm ms): two fresh processes sharing one new, at first empty, Triton cache directory."""
    with tempfile.TemporaryDirectory(prefix="hayabusa-triton-cache-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        command = [sys.executable, "-m", "hayabusa.bench.start_time", "--model", str(model_dir),
                   "--dtype", str(dtype).removeprefix("torch."), "--device", str(device), "--backend", backend]
        if quantization is not None:
            command += ["--quantization", quantization]
        times = []
        for _ in range(2):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"start-time run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            times.append(json.loads(done.stdout.strip().splitlines()[-1])["ms"])
        return times[0], times[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True, choices=tuple(DTYPES))
    parser.add_argument("--device", required=True)
    parser.add_argument("--backend", required=True, choices=("reference", "triton"))
    parser.add_argument("--quantization", default=None)
    args = parser.parse_args(argv)
    ms = time_start(args.model, DTYPES[args.dtype], torch.device(args.device), args.backend, args.quantization)
    print(json.dumps({"ms": ms}))


if __name__ == "__main__":
    main()
