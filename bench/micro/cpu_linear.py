"""Microbenchmark: the CPU linear kernels kernels/cpu_linear.py chooses from, at the 2.7B model's projections.

    python bench/micro/cpu_linear.py --threads 2 --rows 1 16

Each candidate multiplies M rows by one of ROTATION weights in turn, so no weight is in cache when it is read (a
decode step reads each weight once), and the candidates take turns within every round, so a busy neighbour slows
them alike; the figure is the fastest round and the median (ms per weight), and GB/s counts the weight's bytes
(codes + scales) over the fastest round. The machine's load is printed before and after.

Measured 2026-12-07, 2-core AMD EPYC (avx512_bf16, avx512_vnni, no AMX), torch 2.13.0, 2 threads, M = 1, a
quiet moment of a shared machine (min / median ms; read bandwidth of a reduction: ~35 GB/s):

| candidate | 10240x2560 | 7680x2560 | 2560x10240 |
|---|---|---|---|
| fp32 F.linear (MKL) | 6.10 / 6.27 | 4.55 / 4.68 | 4.68 / 4.98 |
| fp32 oneDNN, weight prepacked | 3.58 / 3.76 | 2.62 / 2.89 | 3.31 / 3.77 |
| bf16 F.linear | 2.63 / 2.79 | 1.95 / 2.43 | 2.61 / 3.25 |
| bf16 oneDNN, weight prepacked | 1.97 / 2.13 | 1.46 / 1.69 | 2.01 / 2.21 |
| int8 _weight_int8pack_mm (bf16 x) | 1.26 / 1.33 | 0.95 / 1.38 | 0.94 / 1.07 |
| int8 oneDNN qlinear, x quantized per tensor | 1.21 / 1.30 | 0.90 / 1.03 | 1.25 / 1.43 |
| int8 fbgemm linear_dynamic, x quantized per tensor | 0.85 / 0.87 | 0.60 / 0.70 | 0.88 / 0.98 |
| int4 _weight_int4pack_mm_for_cpu g128 (bf16 x) | 0.68 / 0.70 | 0.52 / 0.69 | 0.69 / 0.75 |
| int4 _weight_int4pack_mm_for_cpu g32 (bf16 x) | 0.72 / 0.75 | 0.54 / 0.65 | 0.71 / 0.79 |

With fp32 activations both int kernels are slow (10240x2560: int8 11.0 ms, int4 22.4 ms). At M = 16 (a prefill
of 16 tokens, 10240x2560): bf16 oneDNN prepacked 2.7 ms, int4 4.9, int8 6.7 (both int kernels redo their
dequantization per 4 rows), fbgemm 1.5. torch.compile's CPU weight-only templates (max-autotune) measured no better
at M = 1 (int4 1.36 vs 1.36 ms, int8 1.43 vs 2.05 ms, 1 thread); torchao 0.18's wheel ships no CPU kernels of its
own (its CPU int4/int8 paths call the same torch ops).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROTATION = 6  # weights per candidate, taken in turn: 6 x 52 MB is far past any cache here
SHAPES = [(10240, 2560), (7680, 2560), (2560, 10240)]  # (N, K): dense_h_to_4h, query_key_value, dense_4h_to_h
Candidate = tuple[Callable[[object], torch.Tensor], list, int]  # (run one weight, the weights, bytes per weight)


def candidates(M: int, N: int, K: int) -> dict[str, Candidate]:
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(M, K, generator=gen)
    xb = x32.bfloat16()
    dense = [torch.randn(N, K, generator=gen) / K**0.5 for _ in range(ROTATION)]
    bf16 = [w.bfloat16() for w in dense]
    codes8 = [torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen) for _ in range(ROTATION)]
    scales8 = [torch.rand(N, generator=gen).bfloat16() / 100 for _ in range(ROTATION)]
    found: dict[str, Candidate] = {
        "fp32 F.linear (MKL)": (lambda w: F.linear(x32, w), dense, N * K * 4),
        "fp32 oneDNN, weight prepacked": (
            lambda w: torch.ops.mkldnn._linear_pointwise(x32, w, None, "none", [], ""),
            [torch.ops.mkldnn._reorder_linear_weight(w) for w in dense], N * K * 4),
        "bf16 F.linear": (lambda w: F.linear(xb, w), bf16, N * K * 2),
        "bf16 oneDNN, weight prepacked": (
            lambda w: torch.ops.mkldnn._linear_pointwise(xb, w, None, "none", [], ""),
            [torch.ops.mkldnn._reorder_linear_weight(w) for w in bf16], N * K * 2),
        "int8 _weight_int8pack_mm (bf16 x)": (lambda a: torch._weight_int8pack_mm(xb, *a),
                                              list(zip(codes8, scales8, strict=True)), N * K + 2 * N),
    }
    found.update(_activation_quantized(x32, codes8, scales8))
    for group in (128, 32):
        packs = [(torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32,
                                                                           generator=gen), 1),
                  torch.rand(K // group, N, 2, generator=gen).bfloat16()) for _ in range(ROTATION)]
        found[f"int4 _weight_int4pack_mm_for_cpu g{group} (bf16 x)"] = (
            lambda a, g=group: torch._weight_int4pack_mm_for_cpu(xb, a[0], g, a[1]), packs,
            N * K // 2 + N * K // group * 4)
    return found


def _activation_quantized(x32: torch.Tensor, codes8: list, scales8: list) -> dict[str, Candidate]:
    """The int8 x int8 products (VNNI), with the activations quantized per tensor on every call."""
    (M, K), N = x32.shape, codes8[0].shape[0]
    zero_points = torch.zeros(N, dtype=torch.int64)

    def onednn(a) -> torch.Tensor:
        packed, scales = a
        low, high = torch.aminmax(x32)
        scale = max(float(high - low) / 255, 1e-8)
        zero = int(round(-float(low) / scale))
        xq = torch.clamp(torch.round(x32 / scale) + zero, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(xq, scale, zero, packed, scales, zero_points, None, 1.0, 0,
                                                  torch.bfloat16, "none", [], "")

    torch.backends.quantized.engine = "fbgemm"
    fbgemm = [torch.ops.quantized.linear_prepack(
        torch._make_per_channel_quantized_tensor(q, s.double(), zero_points, 0), None)
        for q, s in zip(codes8, scales8, strict=True)]
    return {
        "int8 oneDNN qlinear, x quantized per tensor": (
            onednn, [(torch.ops.onednn.qlinear_prepack(q, [M, K]), s.float()) for q, s in zip(codes8, scales8,
                                                                                             strict=True)], N * K),
        "int8 fbgemm linear_dynamic, x quantized per tensor": (
            lambda w: torch.ops.quantized.linear_dynamic(x32, w, False), fbgemm, N * K),
    }


def measure(found: dict[str, Candidate], rounds: int) -> dict[str, list[float]]:
    """ms per weight of each round, the candidates taking turns within a round."""
    for run, weights, _ in found.values():
        run(weights[0])  # first-call setup outside the timing
    times: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(rounds):
        for name, (run, weights, _) in found.items():
            start = time.perf_counter()
            for weight in weights:
                run(weight)
            times[name].append((time.perf_counter() - start) * 1e3 / len(weights))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="M: rows multiplied at once")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average before: {_loadavg()}")
    for M in args.rows:
        for N, K in SHAPES:
            found = candidates(M, N, K)
            times = measure(found, args.rounds)
            print(f"\nM = {M}, weight {N}x{K}\n| candidate | min ms | median ms | GB/s (min) |\n|---|---|---|---|")
            for name, samples in times.items():
                print(f"| {name} | {min(samples):.3f} | {statistics.median(samples):.3f} | "
                      f"{found[name][2] / min(samples) / 1e6:.1f} |")
    print(f"\nload average after: {_loadavg()}")


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as file:
        return " ".join(file.read().split()[:3])


if __name__ == "__main__":
    main()
