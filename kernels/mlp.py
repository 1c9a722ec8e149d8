"""The model's bias-free MLP, residual + gelu(x @ w_in.T) @ w_out.T, as two epilogue-fused GEMMs."""

import torch

from ._launch import check_tensor, check_triton_device
from .linear import linear, linear_ref


def _check_mlp_args(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, residual: torch.Tensor,
                    out: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2)
    M, hidden = x.shape
    check_tensor("w_in", w_in, ndim=2, dtype=x.dtype, device=x.device)
    if w_in.shape[1] != hidden:
        raise ValueError(f"w_in has shape {tuple(w_in.shape)}, expected [intermediate, {hidden}] (x is [M, {hidden}])")
    inter = w_in.shape[0]
    check_tensor("w_out", w_out, shape=(hidden, inter), dtype=x.dtype, device=x.device)
    check_tensor("residual", residual, shape=(M, hidden), dtype=x.dtype, device=x.device)
    if out is not None:
        check_tensor("out", out, shape=(M, hidden), dtype=x.dtype, device=x.device)


def fused_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, residual: torch.Tensor, *,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """residual + gelu(x @ w_in.T) @ w_out.T; x, residual: [M, hidden], w_in: [inter, hidden], w_out: [hidden, inter].

    GELU runs in the first GEMM's epilogue (the pre-activation never reaches memory), the residual add in the
    second's. `out` ([M, hidden], optional) may be `residual` itself for an in-place update.
    """
    _check_mlp_args(x, w_in, w_out, residual, out)
    check_triton_device("x", x)
    activated = linear(x, w_in, activation="gelu")  # [M, inter]
    return linear(activated, w_out, residual=residual, out=out)


def fused_mlp_ref(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, residual: torch.Tensor, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch `fused_mlp`, rounding the GELU output to x's dtype between the GEMMs as the kernel does."""
    _check_mlp_args(x, w_in, w_out, residual, out)
    activated = linear_ref(x, w_in, activation="gelu")
    return linear_ref(activated, w_out, residual=residual, out=out)
