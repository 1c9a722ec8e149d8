"""LayerNorm with bias (fp32 statistics), one program per row (the LayerNorm launch of the tile GEMMs' `ln_linear`)."""

import torch
import triton
import triton.language as tl

from ._launch import (
    cast_rounded,
    check_tensor,
    check_triton_device,
    interpreted_bf16,
    pdl_meta,
    row_block,
    uses_pdl,
    wait_for_prior_grid,
)


@triton.jit
def _layer_norm_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, N, eps, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr,
                       INTERPRETED_BF16: tl.constexpr, PDL: tl.constexpr):
    # x, out: [M, N] rows; weight, bias: [N].
    wait_for_prior_grid(PDL)  # x is the previous kernel's output
    row_start = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    if WHOLE_ROW:  # BLOCK_N >= N: the whole row stays in registers: one read, one write
        mask = cols < N
        row = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(row, axis=0) / N
        centered = tl.where(mask, row - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normalized = cast_rounded(centered * rstd * weight + bias, out_ptr.dtype.element_ty, INTERPRETED_BF16)
        tl.store(out_ptr + row_start + cols, normalized, mask=mask)
    else:  # long rows: walk the row in BLOCK_N chunks (sum, then centered squares, then normalize)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            total += tl.load(x_ptr + row_start + start + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / N
        squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            chunk = tl.load(x_ptr + row_start + start + cols, mask=mask, other=0.0).to(tl.float32)
            centered = tl.where(mask, chunk - mean, 0.0)
            squares += centered * centered
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            chunk = tl.load(x_ptr + row_start + start + cols, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            normalized = cast_rounded((chunk - mean) * rstd * weight + bias, out_ptr.dtype.element_ty, INTERPRETED_BF16)
            tl.store(out_ptr + row_start + start + cols, normalized, mask=mask)


def _check_layer_norm_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           out: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2)
    N = x.shape[1]
    if N == 0:
        raise ValueError(f"x must have at least one column to normalize, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, shape=(N,), dtype=x.dtype, device=x.device)
    check_tensor("bias", bias, shape=(N,), dtype=x.dtype, device=x.device)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if out is not None:
        check_tensor("out", out, shape=tuple(x.shape), dtype=x.dtype, device=x.device)


def launch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """Launch on already-validated arguments: out = LN(x)."""
    M, N = x.shape
    if M == 0:
        return
    block_n, num_warps = row_block(N)
    _layer_norm_kernel[(M,)](x, weight, bias, out, N, float(eps), BLOCK_N=block_n, WHOLE_ROW=block_n >= N,
                             INTERPRETED_BF16=interpreted_bf16(x.dtype, x.device), num_warps=num_warps,
                             **pdl_meta(uses_pdl(x.device)))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; x: [M, N] -> [M, N], fp32 statistics."""
    _check_layer_norm_args(x, weight, bias, eps, out)
    check_triton_device("x", x)
    if out is None:
        out = torch.empty_like(x)
    launch_layer_norm(x, weight, bias, eps, out)
    return out


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch `layer_norm`, computed in fp32 and rounded to x's dtype at the end."""
    _check_layer_norm_args(x, weight, bias, eps, out)
    y = reference_layer_norm(x, weight, bias, eps)
    return y if out is None else out.copy_(y)


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over x's rows in fp32, rounded to x's dtype (arguments already validated)."""
    return torch.nn.functional.layer_norm(x.float(), (x.shape[1],), weight.float(), bias.float(), eps).to(x.dtype)
