"""What the GPU microbenchmarks share: this device's measured ceilings, the Triton-vs-torch report, synced timing.

The ceilings are measured once per session (bench/roofline.py: a 1 GiB device-to-device copy, an 8192^3 matmul),
so every benchmark's "% of ceiling" compares against the same figures.
"""

import functools
from collections.abc import Callable

import torch
import triton.testing

from hayabusa.bench.roofline import measure_copy_bandwidth, measure_matmul_rate


@functools.cache
def copy_bytes_per_s() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the HBM ceiling in practice."""
    return measure_copy_bandwidth(torch.device("cuda"), 1 << 30)


@functools.cache
def matmul_flops_per_s(dtype: torch.dtype) -> float:
    """FLOP/s of an 8192^3 cuBLAS matmul in dtype: the tensor-core ceiling in practice."""
    return measure_matmul_rate(torch.device("cuda"), dtype, 8192)


def time_synced(benchmark, fn: Callable[[], object]) -> None:
    """pytest-benchmark's own column: fn() plus a synchronize per call, so device work is counted."""

    def call_and_sync():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call_and_sync, rounds=20, warmup_rounds=3)


def report(benchmark, name: str, kernel: Callable[[], object], baseline: Callable[[], object], num_bytes: int,
           flops: int | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Median kernel and baseline times (triton.testing.do_bench: CUDA events, L2 flushed between calls), the
    kernel's bandwidth against the copy ceiling and, given its flops, its rate against the dtype matmul ceiling;
    printed and stored in extra_info, then the kernel timed by pytest-benchmark."""
    kernel_ms = triton.testing.do_bench(kernel, return_mode="median")
    torch_ms = triton.testing.do_bench(baseline, return_mode="median")
    bytes_per_s = num_bytes / (kernel_ms / 1e3)
    figures = {"triton_us": kernel_ms * 1e3, "torch_us": torch_ms * 1e3, "speedup": torch_ms / kernel_ms,
               "GB_per_s": bytes_per_s / 1e9, "pct_copy_bandwidth": 100 * bytes_per_s / copy_bytes_per_s(),
               "copy_GB_per_s": copy_bytes_per_s() / 1e9}
    line = (f"\n{name}: triton {figures['triton_us']:.1f} us vs torch {figures['torch_us']:.1f} us "
            f"(x{figures['speedup']:.2f}); {figures['GB_per_s']:.0f} GB/s = {figures['pct_copy_bandwidth']:.0f}% of "
            f"copy {figures['copy_GB_per_s']:.0f} GB/s")
    if flops is not None:
        flops_per_s = flops / (kernel_ms / 1e3)
        figures.update(TFLOP_per_s=flops_per_s / 1e12, pct_matmul_rate=100 * flops_per_s / matmul_flops_per_s(dtype),
                       matmul_TFLOP_per_s=matmul_flops_per_s(dtype) / 1e12)
        line += (f"; {figures['TFLOP_per_s']:.1f} TFLOP/s = {figures['pct_matmul_rate']:.0f}% of "
                 f"cuBLAS {figures['matmul_TFLOP_per_s']:.0f} TFLOP/s")
    benchmark.extra_info.update(figures)
    print(line)
    time_synced(benchmark, kernel)
