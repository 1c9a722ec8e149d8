"""What an omitted dtype means (`--dtype auto`): float16 on a GPU; on a CPU bfloat16 where the CPU multiplies it
natively, else float32.

A CPU with avx512_bf16 (AMD Zen 4+, Intel Cooper Lake) or AMX (Intel Sapphire Rapids+) runs oneDNN's bf16 products
in hardware, and a decode step streams half the bytes: on a 2-core EPYC with avx512_bf16 the 2.7B model decodes in
bf16 about 1.7x faster than in fp32, as OpenVINO and vLLM's CPU backend do by default. Without them oneDNN emulates
bf16 at about fp32 speed, and fp32 is exact, so fp32 stays. `float32` is always the exact path: the tokens
transformers' own fp32 model gives (the tests that rely on exactness ask for it by name).

torch loads when a dtype is resolved, not with this module: the CLI's parsers name AUTO here.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from hayabusa.engine.loading.config import DTYPE_NAMES

if TYPE_CHECKING:
    import torch

AUTO = "auto"  # the dtype name that asks for this module's choice
DTYPE_CHOICES = (AUTO, *DTYPE_NAMES)  # what --dtype takes
DTYPE_HELP = ("auto (the default): float16 on cuda; on cpu bfloat16 where the CPU computes bf16 natively "
              "(avx512_bf16 or AMX), else float32; float32 is the exact path")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bf16 multiplies in hardware
CPUINFO = Path("/proc/cpuinfo")


def auto_dtype(device: torch.device) -> torch.dtype:
    """float16 on cuda; on a cpu, bfloat16 where cpu_has_native_bf16() and oneDNN runs it, else float32."""
    import torch

    if device.type == "cuda":
        return torch.float16
    from hayabusa.kernels._reference_gemm import onednn_fuses

    return torch.bfloat16 if cpu_has_native_bf16() and onednn_fuses(torch.bfloat16) else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU lists a bf16 multiply instruction set (Linux's /proc/cpuinfo; elsewhere: no)."""
    try:
        text = CPUINFO.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return cpu_flags_have_native_bf16(text)


def cpu_flags_have_native_bf16(cpuinfo: str) -> bool:
    """Whether the first `flags` line of a /proc/cpuinfo text lists avx512_bf16 or amx_bf16."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(flag in value.split() for flag in NATIVE_BF16_CPU_FLAGS)
    return False
