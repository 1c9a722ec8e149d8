"""The model's linear layers on a CPU at speed: each weight packed once, when the engine starts, into the layout of
the fastest kernel torch ships for its format and the activations' dtype, then `linear` / `ln_linear` / `fused_mlp`
with the signatures of their `*_ref` twins (which they equal within the dtype's tolerance; fp32 within 1e-5).

Kernels, picked by measurement at M = 1 on the 2.7B model's projections (bench/micro/cpu_linear.py; figures in
its docstring), 2-core EPYC with avx512-bf16 + vnni, weights rotated out of cache:
- dense fp32 / bf16 / fp16 (where oneDNN multiplies the dtype, see _reference_gemm.onednn_fuses): oneDNN's blocked
  layout (torch.ops.mkldnn._reorder_linear_weight), run by _linear_pointwise with the bias, GELU or residual fused
  on the fp32 accumulator. Prepacking is what oneDNN needs to stream the weight: bf16 1.9 ms for a 10240x2560
  weight against 2.6-3.4 unpacked; fp32 3.6 against 6.2 for MKL. Same result as the unpacked oneDNN product.
- int4, bf16 / fp16 activations: torch's tinygemm CPU layout (_convert_weight_to_int4pack_for_cpu), run by
  _weight_int4pack_mm_for_cpu: 0.68 ms (2.7x less than bf16). Groups of 32-256 columns; a per-channel weight or
  larger groups run as groups of 256 or fewer with the scale repeated (the same numbers). It needs N % 16 == 0.
- int8 per output channel, bf16 / fp16 activations: _weight_int8pack_mm on the codes as stored (offset binary
  minus 128 is the signed int8), 0.94-1.3 ms; an asymmetric zero point adds rowsum(x) * (128 - zero) * scale.
  It needs K % 16 == 0.
  fbgemm's dynamic int8 linear streams faster (0.6-0.9 ms) but quantizes the activations too, which changes the
  model's numbers beyond its weights; it is not used.
- anything else (int weights with fp32 activations, where both int kernels are 10-20x slower than dense fp32;
  int8 in groups; shapes the int kernels refuse): the weight dequantized once (dequantize_ref) into the
  activations' dtype and packed as a dense weight.
A weight oneDNN gains nothing on (small fp32 weights, see _reference_gemm) stays as it is and runs `linear_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._launch import check_tensor
from ._reference_gemm import onednn_linear, onednn_takes
from .layernorm import reference_layer_norm
from .linear import ACTIVATIONS, _check_ln_args, linear_ref, ln_linear_ref
from .mlp import fused_mlp_ref
from .quantized_weight import QuantizedWeight, dequantize_ref, unpack_codes

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes, largest first
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs 16 output rows together
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm reads K in vectors of 16: another K crashes it or reads past the row
INT_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KINDS = ("onednn", "int4pack", "int8pack")


@dataclass(frozen=True)
class PackedLinearWeight:
    """A linear weight [N, K] in the layout of one CPU kernel (`kind`), for activations of `dtype`."""

    kind: str  # one of KINDS
    data: Tensor  # onednn: the blocked dense weight; int4pack: uint8 tinygemm layout; int8pack: int8 [N, K]
    scales: Tensor | None  # int4pack: [K // group, N, 2] (scale, offset) in dtype; int8pack: [N] in dtype
    zero_offsets: Tensor | None  # int8pack with zero points: fp32 [N], (128 - zero code) * scale; else None
    group_size: int | None  # int4pack: columns per scale
    out_features: int  # N
    in_features: int  # K
    dtype: torch.dtype  # the activations' (and the output's) dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams for this weight (its data, scales and zero offsets)."""
        return sum(t.nbytes for t in (self.data, self.scales, self.zero_offsets) if t is not None)


LinearWeight = Tensor | QuantizedWeight | PackedLinearWeight


def pack_linear_weight(weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor | PackedLinearWeight:
    """`weight` [N, K] (dense in `dtype`, or quantized) in the form `linear` runs fastest with activations of
    `dtype` on a CPU: a PackedLinearWeight, or the dense tensor where no kernel beats linear_ref on it."""
    if isinstance(weight, QuantizedWeight):
        packed = _pack_quantized(weight, dtype)
        if packed is not None:
            return packed
        weight = dequantize_ref(weight).to(dtype)
    if weight.dtype != dtype:
        raise ValueError(f"a dense weight of dtype {weight.dtype} cannot run with {dtype} activations")
    return _pack_dense(weight) if onednn_takes(weight) else weight


def _pack_dense(weight: Tensor) -> PackedLinearWeight:
    N, K = weight.shape
    data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    return PackedLinearWeight("onednn", data, None, None, None, N, K, weight.dtype)


def _pack_quantized(weight: QuantizedWeight, dtype: torch.dtype) -> PackedLinearWeight | None:
    """The int4 or int8 kernel's layout, or None where neither takes this weight with `dtype` activations."""
    if weight.device.type != "cpu" or dtype not in INT_KERNEL_DTYPES:
        return None
    if weight.bits == 4:
        return _pack_int4(weight, dtype)
    if weight.group_size is None and weight.in_features % INT8_K_MULTIPLE == 0:
        return _pack_int8(weight, dtype)
    return None


def _int4_group(weight: QuantizedWeight) -> int | None:
    """The kernel's group size for this weight: its own, or one that divides it (scales repeated)."""
    span = weight.group_size or weight.in_features  # columns sharing one scale
    return next((g for g in INT4_GROUP_SIZES if span % g == 0), None)


def _pack_int4(weight: QuantizedWeight, dtype: torch.dtype) -> PackedLinearWeight | None:
    N, K = weight.shape
    group = _int4_group(weight)
    if group is None or N % INT4_N_MULTIPLE or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return None
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(weight).to(torch.int32), 1)
    # The kernel computes w = (u - 8) * scale + offset, so offset = (8 - zero code) * scale: [N, G] -> [K / group, N]
    scales = weight.scales.float()
    zeros = torch.full_like(scales, weight.zero_code) if weight.zeros is None else weight.zeros.float()
    offsets = (8 - zeros) * scales
    repeat = (weight.group_size or K) // group
    scale_and_offset = torch.stack((scales, offsets), dim=-1).repeat_interleave(repeat, dim=1)  # [N, K / group, 2]
    scale_and_offset = scale_and_offset.transpose(0, 1).contiguous().to(dtype)  # [K / group, N, 2]
    return PackedLinearWeight("int4pack", data, scale_and_offset, None, group, N, K, dtype)


def _pack_int8(weight: QuantizedWeight, dtype: torch.dtype) -> PackedLinearWeight:
    N, K = weight.shape
    codes = (weight.qweight.to(torch.int16) - 128).to(torch.int8)  # offset binary -> two's complement
    scales = weight.scales[:, 0]  # [N]
    zero_offsets = None
    if weight.zeros is not None:
        zero_offsets = (128 - weight.zeros[:, 0].float()) * scales.float()
    return PackedLinearWeight("int8pack", codes, scales.to(dtype).contiguous(), zero_offsets, None, N, K, dtype)


def linear(x: Tensor, weight: LinearWeight, *, bias: Tensor | None = None, residual: Tensor | None = None,
           activation: str | None = None, out: Tensor | None = None, checked: bool = True) -> Tensor:
    """act(x @ weight.T + bias) + residual: [M, N] in x's dtype, into out when given; x: [M, K]. A weight not
    packed by pack_linear_weight runs linear_ref."""
    if not isinstance(weight, PackedLinearWeight):
        return linear_ref(x, weight, bias=bias, residual=residual, activation=activation, out=out, checked=checked)
    if checked:
        _check_packed_args(x, weight, bias, residual, activation, out)
    if x.shape[0] == 0:
        return torch.empty(0, weight.out_features, dtype=x.dtype) if out is None else out
    y = _run_packed(x.contiguous(), weight, bias, residual, activation)
    return y if out is None else out.copy_(y)


def ln_linear(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, weight: LinearWeight, *,
              bias: Tensor | None = None, residual: Tensor | None = None, activation: str | None = None,
              out: Tensor | None = None, checked: bool = True) -> Tensor:
    """linear(layer_norm(x)), the LayerNorm rounded to x's dtype as in ln_linear_ref."""
    if not isinstance(weight, PackedLinearWeight):
        return ln_linear_ref(x, ln_weight, ln_bias, eps, weight, bias=bias, residual=residual, activation=activation,
                             out=out, checked=checked)
    if checked:
        _check_ln_args(x, ln_weight, ln_bias, eps)
    return linear(reference_layer_norm(x, ln_weight, ln_bias, eps), weight, bias=bias, residual=residual,
                  activation=activation, out=out, checked=checked)


def fused_mlp(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, w_in: LinearWeight, w_out: LinearWeight, *,
              out: Tensor | None = None, checked: bool = True) -> Tensor:
    """x + gelu(layer_norm(x) @ w_in.T) @ w_out.T, as fused_mlp_ref rounds it."""
    if not isinstance(w_in, PackedLinearWeight) and not isinstance(w_out, PackedLinearWeight):
        return fused_mlp_ref(x, ln_weight, ln_bias, eps, w_in, w_out, out=out, checked=checked)
    activated = ln_linear(x, ln_weight, ln_bias, eps, w_in, activation="gelu", checked=checked)
    return linear(activated, w_out, residual=x, out=out, checked=checked)


def _run_packed(x: Tensor, weight: PackedLinearWeight, bias: Tensor | None, residual: Tensor | None,
                activation: str | None) -> Tensor:
    if weight.kind == "onednn":
        if activation and residual is not None:  # oneDNN fuses one of the two
            return (onednn_linear(x, weight.data, bias, None, activation).float() + residual).to(x.dtype)
        return onednn_linear(x, weight.data, bias, residual, activation)
    if weight.kind == "int4pack":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.data, weight.group_size, weight.scales).float()
    else:
        y = torch.ops.aten._weight_int8pack_mm(x, weight.data, weight.scales).float()
        if weight.zero_offsets is not None:
            y += x.float().sum(dim=1, keepdim=True) * weight.zero_offsets
    if bias is not None:
        y += bias
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    if residual is not None:
        y += residual
    return y.to(x.dtype)


def _check_packed_args(x: Tensor, weight: PackedLinearWeight, bias: Tensor | None, residual: Tensor | None,
                       activation: str | None, out: Tensor | None) -> None:
    check_tensor("x", x, ndim=2, dtype=weight.dtype, device=torch.device("cpu"))
    M, K = x.shape
    N = weight.out_features
    if K != weight.in_features:
        raise ValueError(f"weight has shape {weight.shape}, expected [N, {K}] to match x's K = {K}")
    for name, tensor, shape in (("bias", bias, (N,)), ("residual", residual, (M, N)), ("out", out, (M, N))):
        if tensor is not None:
            check_tensor(name, tensor, shape=shape, dtype=x.dtype, device=x.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
