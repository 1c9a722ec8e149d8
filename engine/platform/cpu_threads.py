"""How many threads torch's CPU ops get for a model, chosen once when an engine starts on a CPU.

Every torch op that runs in parallel ends in a barrier: its threads wait for the slowest. Measured on a 2-core
EPYC VM (fp32 decode, ms per step, 1 vs 2 threads, another process holding about one core):
    tiny (20 MB of weights per step)      4.8 vs 17.6
    small (160 MB)                         25 vs 83
    2.7B (10.7 GB)                        841 vs 1822
A thread that shares its core with another process reaches each barrier up to a scheduler tick (4 ms) late, so
on a busy machine every extra thread costs more than it brings. On an idle one a big model's weight streaming
gains from every core (copy bandwidth 26 -> 34 GB/s from 1 to 2 threads here), while a small model's ops are too
short to split: their barrier costs as much as the work.

So, unless the user chose (OMP_NUM_THREADS or MKL_NUM_THREADS set, or torch.set_num_threads changed since hayabusa
was imported): models below SMALL_MODEL_BYTES of weights per decode step get 1 thread, bigger ones every core
that other processes leave free (at least 1), sampled from /proc at start. The choice is process-wide, as
torch's thread count is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.platform.machine_load import measure_machine_load

SMALL_MODEL_BYTES = 1 << 30  # 1 GiB per step: the 'small' preset (160 MB) and below are sync-bound
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
TORCH_THREADS_AT_IMPORT = torch.get_num_threads()  # torch's default, unless the user set it before importing us
_applied: list[int] = []  # the count this module last set: an earlier engine's choice is not the user's

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def model_weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the weights a decode step reads: every layer, the LM head (ties counted once: a lower bound)."""
    h = config.hidden_size
    per_layer = 4 * h * h + 2 * h * config.intermediate_size
    return (config.num_hidden_layers * per_layer + config.vocab_size * h) * dtype.itemsize


def choose_cpu_threads(config: ModelConfig, dtype: torch.dtype) -> ThreadChoice:
    """The thread count for this model on this machine now, and why (see the module docstring)."""
    pinned = [f"{name}={os.environ[name]}" for name in THREAD_ENV_VARS if os.environ.get(name)]
    if pinned:
        return ThreadChoice(torch.get_num_threads(), f"set by {', '.join(pinned)}")
    if torch.get_num_threads() not in (TORCH_THREADS_AT_IMPORT, *_applied):
        return ThreadChoice(torch.get_num_threads(), "set by torch.set_num_threads")
    weight_bytes = model_weight_bytes(config, dtype)
    if weight_bytes < SMALL_MODEL_BYTES:
        return ThreadChoice(1, f"{weight_bytes / 2**20:.0f} MiB of weights per step: ops too short to split")
    cores = TORCH_THREADS_AT_IMPORT  # torch's default: the physical cores
    load = measure_machine_load()
    if load.other_busy_cpus is None:
        return ThreadChoice(cores, "every core (machine load unknown)")
    free = max(1, min(cores, round(cores - load.other_busy_cpus)))
    return ThreadChoice(free, f"{cores} cores, {load.other_busy_cpus:.1f} kept busy by other processes")


def apply_cpu_threads(config: ModelConfig, dtype: torch.dtype) -> ThreadChoice:
    """Choose and set torch's intra-op threads for a CPU engine; returns the choice (logged at INFO)."""
    choice = choose_cpu_threads(config, dtype)
    torch.set_num_threads(choice.threads)
    _applied[:] = [choice.threads]
    log.info("hayabusa: %d CPU thread(s): %s", choice.threads, choice.reason)
    return choice
