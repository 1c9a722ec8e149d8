"""The model's MLP block as the paged model runs it: x + gelu(LN(x) @ w_in.T) @ w_out.T (post_attention_layernorm,
dense_h_to_4h with GELU, dense_4h_to_h, and the residual add), as two epilogue-fused GEMMs: `ln_linear` (the LayerNorm
in the GEMV's prologue up to GEMV_MAX_M rows, a LayerNorm launch above; GELU in the epilogue, so the pre-activation
never reaches memory), then `linear` (the residual add in its epilogue). Two launches at decode sizes.
"""

import torch

from ._launch import check_tensor, check_triton_device
from .linear import _check_ln_args, linear, linear_ref, ln_linear, ln_linear_ref
from .quantized_weight import QuantizedWeight, check_quantized_weight

Weight = torch.Tensor | QuantizedWeight


def _check_mlp_args(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                    w_in: Weight, w_out: Weight, out: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2)
    M, hidden = x.shape
    _check_ln_args(x, ln_weight, ln_bias, eps)
    _check_weight("w_in", w_in, x)
    if w_in.shape[1] != hidden:
        raise ValueError(f"w_in has shape {tuple(w_in.shape)}, expected [intermediate, {hidden}] (x is [M, {hidden}])")
    inter = w_in.shape[0]
    _check_weight("w_out", w_out, x)
    if tuple(w_out.shape) != (hidden, inter):
        raise ValueError(f"w_out has shape {tuple(w_out.shape)}, expected {(hidden, inter)}")
    if out is not None:
        check_tensor("out", out, shape=(M, hidden), dtype=x.dtype, device=x.device)


def _check_weight(name: str, weight: Weight, x: torch.Tensor) -> None:
    if isinstance(weight, QuantizedWeight):
        check_quantized_weight(name, weight)
        if weight.device != x.device:
            raise ValueError(f"{name} is on {weight.device}, expected {x.device}")
    else:
        check_tensor(name, weight, ndim=2, dtype=x.dtype, device=x.device)


def fused_mlp(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w_in: Weight,
              w_out: Weight, *, out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
    """x + gelu(layer_norm(x) @ w_in.T) @ w_out.T; x: [M, hidden] (the residual stream), ln_weight/ln_bias: [hidden],
    w_in: [inter, hidden], w_out: [hidden, inter] (tensors of x's dtype, or QuantizedWeights) -> [M, hidden].

    `out` ([M, hidden], optional) may be x itself: the residual stream updated in place. checked=False skips the
    argument checks: only for arguments valid by construction (the paged model's layer loop).
    """
    if checked:
        _check_mlp_args(x, ln_weight, ln_bias, eps, w_in, w_out, out)
        check_triton_device("x", x)
    activated = ln_linear(x, ln_weight, ln_bias, eps, w_in, activation="gelu", checked=False)  # [M, inter]
    return linear(activated, w_out, residual=x, out=out, checked=False)


def fused_mlp_ref(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w_in: Weight,
                  w_out: Weight, *, out: torch.Tensor | None = None, checked: bool = True) -> torch.Tensor:
    """Plain-PyTorch `fused_mlp`, rounding the normalized x and the GELU output to x's dtype between the GEMMs as
    the kernels do (always checks)."""
    _check_mlp_args(x, ln_weight, ln_bias, eps, w_in, w_out, out)
    activated = ln_linear_ref(x, ln_weight, ln_bias, eps, w_in, activation="gelu")
    return linear_ref(activated, w_out, residual=x, out=out)
