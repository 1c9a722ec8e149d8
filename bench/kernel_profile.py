"""Where one hayabusa decode step spends its GPU time: every kernel it runs, in order, with its duration and the
idle gap before it, from torch.profiler (CUPTI). The gaps are what launch overhead and host work cost the step.

CUDA only: on a CPU there are no device kernels to time, and the table is skipped with that reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from hayabusa.bench.runners import EngineUnavailable, HayabusaRunner
from hayabusa.bench.workloads import random_prompts

WARM_STEPS = 2  # decode steps run before the profiled one: graphs replayed, allocator settled


def decode_step_kernels(runner: HayabusaRunner, batch: int, prompt_len: int) -> dict[str, Any]:
    """Profile the decode step after WARM_STEPS others, with `batch` sequences of prompt_len-token prompts.

    Returns {batch, prompt_len, kernels: [{name, us, gap_before_us}] in start order, step_us (first kernel's start
    to last kernel's end), kernel_us, gap_us, launches}."""
    if runner.device.type != "cuda":
        raise EngineUnavailable("the per-kernel decode table times GPU kernels (torch.profiler, CUDA only)")
    from hayabusa.engine.sampling_params import SamplingParams

    paged = runner.engine.paged  # the engine's step loop: add_request / step / abort
    params = SamplingParams(max_new_tokens=WARM_STEPS + 3, do_sample=False, ignore_eos=True)
    ids = [paged.add_request(prompt, params) for prompt in random_prompts([prompt_len] * batch, seed=6000 + batch)]
    try:
        for _ in range(1 + WARM_STEPS):  # the prefill, then the warm decode steps
            paged.step()
        torch.cuda.synchronize(runner.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            paged.step()
            torch.cuda.synchronize(runner.device)
    finally:
        for request_id in ids:
            paged.abort(request_id)
        while paged.has_unfinished_requests():
            paged.step()
    return {"batch": batch, "prompt_len": prompt_len, **kernel_timeline(prof.events())}


def kernel_timeline(events) -> dict[str, Any]:
    """The device events (kernels, memcpy, memset) of a profile in start order, each with the gap before it."""
    device_events = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                           key=lambda e: e.time_range.start)
    kernels, previous_end = [], None
    for event in device_events:
        start, end = event.time_range.start, event.time_range.end  # us
        gap = 0.0 if previous_end is None else max(start - previous_end, 0.0)
        kernels.append({"name": event.name, "us": end - start, "gap_before_us": gap})
        previous_end = end if previous_end is None else max(previous_end, end)
    if not kernels:
        return {"kernels": [], "step_us": 0.0, "kernel_us": 0.0, "gap_us": 0.0, "launches": 0}
    step_us = previous_end - device_events[0].time_range.start
    return {"kernels": kernels, "step_us": step_us, "kernel_us": sum(k["us"] for k in kernels),
            "gap_us": sum(k["gap_before_us"] for k in kernels), "launches": len(kernels)}


def kernel_summary(kernels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kernel name, by total time: {name, calls, total_us, mean_us, gap_before_us (summed)}."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "total_us": 0.0, "gap_before_us": 0.0})
    for kernel in kernels:
        row = rows[kernel["name"]]
        row["calls"] += 1
        row["total_us"] += kernel["us"]
        row["gap_before_us"] += kernel["gap_before_us"]
    return sorted(({"name": name, **row, "mean_us": row["total_us"] / row["calls"]} for name, row in rows.items()),
                  key=lambda r: -r["total_us"])
