"""A quantized Linear's weight as the loader meets it: the tensors a compressed-tensors checkpoint stores for it
(`stored_tensor_specs`, checked before anything is read), those tensors made one QuantizedWeight (`read_quantized`),
and an fp weight quantized while loading (`quantize_weight`).

Scales are converted to the load dtype, as every float tensor of a checkpoint is, so the engine's numbers are
those of transformers loading the checkpoint in that dtype and decompressing it: W = (q - zero) * scale, with the
scale in the load dtype (exact in float32). The codes are never widened: no fp copy of a quantized weight exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from hayabusa.engine.loading.compressed_tensors_config import PACKED_FORMAT, ModuleQuantization
from hayabusa.engine.loading.quant_schemes import WeightScheme
from hayabusa.engine.loading.tensor_names import LinearWeight
from hayabusa.kernels.compressed_tensors_format import from_pack_quantized, pack_codes, quantize_rtn
from hayabusa.kernels.quantized_weight import QuantizedWeight

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
# RTN runs in the dtype the checkpoint stores a weight in (as llm-compressor, loading a model with dtype="auto"):
# float64, which no kernel reads, is quantized in float32.
QUANTIZE_DTYPES = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float32,
                   torch.float64: torch.float32}


@dataclass(frozen=True)
class TensorSpec:
    """What one stored tensor must be: its shape, and its dtypes (None: any float dtype)."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    optional: bool = False  # a symmetric scheme's zero point, which older compressed-tensors wrote (all zero)


def check_groups(name: str, scheme: WeightScheme, in_features: int, why: str) -> None:
    """ValueError when the scheme's groups do not tile the weight's K columns (the kernels need whole groups)."""
    if scheme.group_size is not None and in_features % scheme.group_size:
        raise ValueError(f"{why} in groups of {scheme.group_size} columns, but '{name}' has {in_features} "
                         f"(K must be a multiple of the group size); a scheme with one scale per output channel "
                         f"(W8A16_CHANNEL, --quantization int8) fits any K")


def stored_tensor_specs(module: str, quantization: ModuleQuantization, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """The tensors a checkpoint stores for Linear `module` of dense shape (N, K) in its quantization."""
    scheme = quantization.scheme
    N, K = shape
    check_groups(f"{module}.weight", scheme, K, f"config.json's quantization_config stores '{module}' ({scheme.name})")
    groups = 1 if scheme.group_size is None else K // scheme.group_size
    scale = TensorSpec((N, groups), SCALE_DTYPES)
    if quantization.format == PACKED_FORMAT:
        specs = {"weight_packed": TensorSpec((N, -(-K * scheme.bits // 32)), (torch.int32,)), "weight_scale": scale,
                 "weight_shape": TensorSpec((2,), INT_DTYPES),
                 "weight_zero_point": TensorSpec((-(-N * scheme.bits // 32), groups), (torch.int32,),
                                                 optional=scheme.symmetric)}
    else:
        specs = {"weight": TensorSpec((N, K), (torch.int8,)), "weight_scale": scale,
                 "weight_zero_point": TensorSpec((N, groups), (torch.int8,), optional=scheme.symmetric)}
    return {f"{module}.{suffix}": spec for suffix, spec in specs.items()}


def read_quantized(module: str, quantization: ModuleQuantization, shape: tuple[int, int],
                   read_tensor: Callable[[str], Tensor], stored: set[str], dtype: torch.dtype,
                   device: torch.device) -> QuantizedWeight:
    """Linear `module`'s stored tensors (checked against stored_tensor_specs) as one QuantizedWeight on `device`,
    scales in `dtype`; ValueError naming the tensor whose values the format forbids."""
    scheme = quantization.scheme
    N, K = shape
    zero_point = f"{module}.weight_zero_point"
    zero_point = read_tensor(zero_point) if zero_point in stored else None
    if scheme.symmetric and zero_point is not None:
        if bool(zero_point.any()):
            raise ValueError(f"tensor '{module}.weight_zero_point' holds nonzero zero points, but config.json's "
                             f"quantization_config says the scheme of '{module}' is symmetric")
        zero_point = None
    scale = read_tensor(f"{module}.weight_scale")
    if quantization.format == PACKED_FORMAT:
        stored_shape = read_tensor(f"{module}.weight_shape")
        if stored_shape.tolist() != [N, K]:
            raise ValueError(f"tensor '{module}.weight_shape' is {stored_shape.tolist()}, expected {[N, K]} from "
                             "config.json")
        weight = from_pack_quantized(read_tensor(f"{module}.weight_packed"), scale, stored_shape, scheme.bits,
                                     scheme.group_size, zero_point)
    else:
        weight = _from_int8(module, read_tensor(f"{module}.weight"), scale, zero_point, scheme)
    return _placed(weight, dtype, device)


def _from_int8(module: str, q: Tensor, scale: Tensor, zero_point: Tensor | None,
               scheme: WeightScheme) -> QuantizedWeight:
    """naive-quantized / int-quantized tensors (q as int8 [N, K], zero points int8 [N, G]) -> QuantizedWeight."""
    low, high = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    for name, values in (("weight", q), ("weight_zero_point", zero_point)):
        if values is not None and (int(values.min()) < low or int(values.max()) > high):
            raise ValueError(f"tensor '{module}.{name}' holds values outside [{low}, {high}], the range of "
                             f"{scheme.bits}-bit integers its quantization_config gives")
    offset = 1 << (scheme.bits - 1)
    codes = pack_codes((q.to(torch.int16) + offset).to(torch.uint8), scheme.bits)
    zeros = None if zero_point is None else (zero_point.to(torch.int16) + offset).to(torch.uint8).contiguous()
    return QuantizedWeight(codes, scale.contiguous(), zeros, scheme.bits, scheme.group_size, q.shape[1])


def quantize_weight(weight: Tensor, scheme: WeightScheme, dtype: torch.dtype, device: torch.device) -> QuantizedWeight:
    """An fp weight [N, K] (as stored) quantized round-to-nearest on `device` in its stored dtype (what llm-compressor
    computes for the scheme), scales then in `dtype`."""
    stored = weight.to(device=device, dtype=QUANTIZE_DTYPES[weight.dtype])
    return _placed(quantize_rtn(stored, scheme.bits, scheme.group_size, scheme.symmetric), dtype, device)


def scheme_counts(weights: Iterable[LinearWeight]) -> dict[str, int]:
    """The quantized weights among `weights`, counted by scheme name (a preset's, or a description), first seen
    first; empty when none is quantized."""
    counts: dict[str, int] = {}
    for weight in weights:
        if isinstance(weight, QuantizedWeight):
            name = WeightScheme(weight.bits, weight.group_size, weight.zeros is None).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def _placed(weight: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> QuantizedWeight:
    """The weight on `device` with its scales in `dtype` (the codes and zero codes as they are)."""
    zeros = None if weight.zeros is None else weight.zeros.to(device)
    return QuantizedWeight(weight.qweight.to(device), weight.scales.to(device=device, dtype=dtype).contiguous(), zeros,
                           weight.bits, weight.group_size, weight.in_features)
