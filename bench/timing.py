"""Wall-clock timing of one call: CUDA events + synchronize on a GPU, perf_counter on a CPU; warm-up excluded."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds `fn()` takes, all device work it queued included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


@dataclass
class Timing:
    samples_ms: list[float]  # the timed calls
    warmup_ms: float | None  # the first warm-up call (compilation, allocator and cache warm-up), not in samples


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """`repeats` timed calls after `warmup` excluded ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    warmups = [time_once_ms(fn, device) for _ in range(warmup)]
    return Timing([time_once_ms(fn, device) for _ in range(repeats)], warmups[0] if warmups else None)


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("median of no samples")
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
