"""The torch op set's linear layers (`linear`, `ln_linear`, `mlp`): the kernels' plain-PyTorch twins on a dense
weight, and `quantized_linear` on a QuantizedWeight, the one function a faster CPU implementation of int8 / int4
weights replaces (same arguments, same result in x's dtype).

`quantized_linear` here is correct and slow: it dequantizes the whole weight (dequantize_ref, in the scales' dtype)
on every call, then multiplies as linear_ref does. The dense copy lives for that call only.
"""

from __future__ import annotations

from torch import Tensor

from hayabusa.engine.loading.tensor_names import LinearWeight
from hayabusa.kernels.layernorm import layer_norm_ref
from hayabusa.kernels.linear import linear_ref, ln_linear_ref
from hayabusa.kernels.quantized_weight import QuantizedWeight


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None, residual: Tensor | None,
                     activation: str | None) -> Tensor:
    """act(x @ dequantize(weight).T + bias) + residual: x [M, K] -> [M, N] in x's dtype, accumulated in fp32."""
    return linear_ref(x, weight, bias=bias, residual=residual, activation=activation)


def linear(x: Tensor, weight: LinearWeight, *, bias: Tensor | None = None, residual: Tensor | None = None,
           activation: str | None = None, out: Tensor | None = None, checked: bool = True) -> Tensor:
    """kernels.linear's twin; a QuantizedWeight goes to quantized_linear (arguments valid by construction)."""
    if not isinstance(weight, QuantizedWeight):
        return linear_ref(x, weight, bias=bias, residual=residual, activation=activation, out=out, checked=checked)
    y = quantized_linear(x, weight, bias, residual, activation)
    return y if out is None else out.copy_(y)


def ln_linear(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, weight: LinearWeight, *,
              bias: Tensor | None = None, residual: Tensor | None = None, activation: str | None = None,
              out: Tensor | None = None, checked: bool = True) -> Tensor:
    """kernels.ln_linear's twin: the LayerNorm rounded to x's dtype, then `linear`."""
    if not isinstance(weight, QuantizedWeight):
        return ln_linear_ref(x, ln_weight, ln_bias, eps, weight, bias=bias, residual=residual, activation=activation,
                             out=out, checked=checked)
    return linear(layer_norm_ref(x, ln_weight, ln_bias, eps), weight, bias=bias, residual=residual,
                  activation=activation, out=out)


def mlp(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, w_in: LinearWeight, w_out: LinearWeight, *,
        out: Tensor | None = None, checked: bool = True) -> Tensor:
    """kernels.fused_mlp's twin: x + gelu(ln_linear(x) @ w_in.T) @ w_out.T, rounded to x's dtype between the two."""
    activated = ln_linear(x, ln_weight, ln_bias, eps, w_in, activation="gelu", checked=checked)  # [M, inter]
    return linear(activated, w_out, residual=x, out=out, checked=checked)
