"""The ops the paged model runs, as a pluggable set: `load_ops("triton")` the Triton kernels, `load_ops("torch")` their
plain-PyTorch `*_ref` twins (same signatures and cache writes), which lets CPU tests drive the whole paged engine at
scale without the slow Triton interpreter. Both sets' linear ops take a dense weight or a QuantizedWeight; the torch
set's live in torch_linears.py, where `quantized_linear` is the seam for a fast CPU path on quantized weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

OP_SETS = ("triton", "torch")


@dataclass(frozen=True)
class OpSet:
    name: str
    linear: Callable[..., Tensor]
    ln_linear: Callable[..., Tensor]  # linear(layer_norm(x)): the LayerNorm fused into the GEMM where it pays
    layer_norm: Callable[..., Tensor]
    mlp: Callable[..., Tensor]  # x + gelu(ln_linear(x)) @ w_out.T: the MLP block as two fused linears
    prefill_attention: Callable[..., Tensor]
    decode_attention: Callable[..., Tensor]


def load_ops(name: str) -> OpSet:
    """"triton": the kernels; "torch": their *_ref references (CPU tests, debugging)."""
    if name not in OP_SETS:
        raise ValueError(f"op set must be one of {OP_SETS}, got {name!r}")
    suffix = "" if name == "triton" else "_ref"

    def op(module: str, function: str) -> Callable[..., Tensor]:
        return getattr(importlib.import_module(f"hayabusa.kernels.{module}"), function + suffix)

    if name == "torch":
        from hayabusa.engine.model import torch_linears

        linears = dict(linear=torch_linears.linear, ln_linear=torch_linears.ln_linear, mlp=torch_linears.mlp)
    else:
        linears = dict(linear=op("linear", "linear"), ln_linear=op("linear", "ln_linear"), mlp=op("mlp", "fused_mlp"))
    return OpSet(
        name=name,
        **linears,
        layer_norm=op("layernorm", "layer_norm"),
        prefill_attention=op("prefill_attention", "prefill_attention"),
        decode_attention=op("decode_attention", "decode_attention"),
    )
