"""`hayabusa bench --scenarios serve`: the HTTP server under load. `hayabusa serve` runs in a process of its own on
loopback; locust's streaming users (serve_load.py) keep 1, 8, 32 and 128 requests in flight (sizes.serve_users),
each a prompt of serve_prompt_len random token ids continued by exactly serve_gen_len tokens (end-of-sequence
ignored), for serve_seconds per number of users. Each record holds the completed requests per second, generated
tokens per second, and the time to first token and inter-token latency (gaps between streamed chunks) at p50 and
p99, as a client measures them. Server and load generator share the machine: on a small CPU they compete for it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from hayabusa.bench.records import BenchRecord
from hayabusa.bench.runners import EngineUnavailable
from hayabusa.bench.serve_load import LoadResult, run_load
from hayabusa.bench.workloads import random_prompts
from hayabusa.engine.platform.machine_load import measure_machine_load

if TYPE_CHECKING:
    from hayabusa.bench.suite import SuiteSettings

SERVED_NAME = "bench"
START_TIMEOUT_S = 600  # loading the model (and, on a GPU, capturing its CUDA graphs)
STOP_TIMEOUT_S = 60
PROMPTS = 256  # distinct prompts drawn from, so that few requests are prefix-cache hits
BLOCK_SIZE = 16


def check_serve_packages() -> None:
    import importlib.util

    missing = [m for m in ("uvicorn", "starlette", "pydantic", "prometheus_client", "locust")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(f"{', '.join(missing)} not installed; pip install \"hayabusa[bench,serve]\"")


@contextlib.contextmanager
def served(settings: SuiteSettings, kv_cache_blocks: int | None) -> Iterator[str]:
    """`hayabusa serve` on a free loopback port until the block ends (then SIGTERM: it drains and exits); its URL."""
    command = [sys.executable, "-m", "hayabusa", "serve", "--model", str(settings.model_dir), "--host", "127.0.0.1",
               "--port", "0", "--device", str(settings.device), "--dtype", str(settings.dtype).removeprefix("torch."),
               "--served-model-name", SERVED_NAME, "--log-level", "warning", "--grace", "5",
               "--max-num-seqs", str(max(256, *settings.sizes.serve_users))]
    if kv_cache_blocks is not None:
        command += ["--kv-cache-blocks", str(kv_cache_blocks)]
    environment = dict(os.environ)
    if settings.threads is not None:
        environment["OMP_NUM_THREADS"] = str(settings.threads)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        line = process.stdout.readline()
        found = re.search(r" on (http://127\.0\.0\.1:\d+);", line)
        if found is None:
            raise RuntimeError(f"hayabusa serve did not start: {line}{process.stderr.read()[-2000:]}")
        url = found.group(1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hayabusa serve never became healthy: {process.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def run_serve(settings: SuiteSettings) -> list[BenchRecord]:
    check_serve_packages()
    sizes = settings.sizes
    prompts = random_prompts([sizes.serve_prompt_len] * PROMPTS, seed=7000)
    blocks_per_request = math.ceil((sizes.serve_prompt_len + sizes.serve_gen_len) / BLOCK_SIZE)
    # on a CPU the server's default pool is sized for a few full-context sequences: give every user its room
    kv_cache_blocks = (max(sizes.serve_users) + 1) * blocks_per_request if settings.device.type == "cpu" else None
    workload = {"model": SERVED_NAME, "prompts": prompts, "max_tokens": [sizes.serve_gen_len] * 2, "hang_up": 0.0,
                "seed": 7001}
    records = []
    with served(settings, kv_cache_blocks) as url:
        run_load(url, users=1, workload={**workload, "max_requests": 2}, run_time_s=START_TIMEOUT_S)  # warm-up
        for users in sizes.serve_users:
            load = measure_machine_load().as_dict()
            result = run_load(url, users=users, workload=workload, run_time_s=sizes.serve_seconds)
            records.append(serve_record(settings, result, load))
    return records


def serve_record(settings: SuiteSettings, result: LoadResult, load: dict) -> BenchRecord:
    sizes = settings.sizes
    figures = result.summary()
    figures["ttft_samples_ms"] = [t * 1e3 for t in result.ttft_s]
    figures["machine_load"] = {key: load[key] for key in ("loadavg_1m", "other_busy_cpus", "others_busy")}
    figures["torch_threads"] = settings.threads  # None: the server chose its own
    return BenchRecord("hayabusa", "serve", f"users{result.users}", result.users, sizes.serve_prompt_len,
                       sizes.serve_gen_len, figures["itl_p50_ms"], figures["ttft_p50_ms"], result.tokens_per_s, None,
                       None, 1, [result.seconds * 1e3], None, figures)
