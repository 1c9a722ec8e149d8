"""The ops the paged model runs, as a pluggable set: `load_ops("triton")` the Triton kernels, `load_ops("torch")` their
plain-PyTorch `*_ref` twins (same signatures and cache writes), which lets CPU tests drive the whole paged engine at
scale without the slow Triton interpreter, and is the CPU's fast path: on a CPU its linear weights are packed once,
when the model is built, for the fastest kernel torch ships for their format and dtype (kernels/cpu_linear.py), and
its linear ops take them so.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hayabusa.kernels.quantized_weight import QuantizedWeight

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
    # (weight [N, K], activation dtype) -> what linear / ln_linear / mlp take as that weight; called once per weight
    pack_linear_weight: Callable[[Tensor | QuantizedWeight, torch.dtype], object]


def unpacked(weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor | QuantizedWeight:
    """The Triton kernels (and the references off the CPU) read a weight as it is loaded."""
    return weight


def pack_for_cpu(weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> object:
    """On a CPU, the layout of the fastest kernel for the weight (kernels/cpu_linear.py); elsewhere the weight."""
    if weight.device.type != "cpu":
        return weight
    from hayabusa.kernels.cpu_linear import pack_linear_weight

    return pack_linear_weight(weight, dtype)


def load_ops(name: str) -> OpSet:
    """"triton": the kernels; "torch": their *_ref references, with the linear ops of kernels/cpu_linear.py, which
    run a packed weight on its CPU kernel and any other on the *_ref twin (CPU tests, debugging, the CPU backend)."""
    if name not in OP_SETS:
        raise ValueError(f"op set must be one of {OP_SETS}, got {name!r}")

    def op(module: str, function: str) -> Callable[..., Tensor]:
        return getattr(importlib.import_module(f"hayabusa.kernels.{module}"), function)

    if name == "triton":
        return OpSet(name=name, linear=op("linear", "linear"), ln_linear=op("linear", "ln_linear"),
                     layer_norm=op("layernorm", "layer_norm"), mlp=op("mlp", "fused_mlp"),
                     prefill_attention=op("prefill_attention", "prefill_attention"),
                     decode_attention=op("decode_attention", "decode_attention"), pack_linear_weight=unpacked)
    return OpSet(name=name, linear=op("cpu_linear", "linear"), ln_linear=op("cpu_linear", "ln_linear"),
                 layer_norm=op("layernorm", "layer_norm_ref"), mlp=op("cpu_linear", "fused_mlp"),
                 prefill_attention=op("prefill_attention", "prefill_attention_ref"),
                 decode_attention=op("decode_attention", "decode_attention_ref"), pack_linear_weight=pack_for_cpu)
