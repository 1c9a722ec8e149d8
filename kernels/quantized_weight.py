"""A linear layer's weight stored as int8 or int4 codes with scales (and zero points), as the quantized kernels read
it in memory, and `dequantize_ref`, its plain-PyTorch meaning.

The weight W [N, K] (N output features, K input features) is cut along K into groups of `group_size` columns (or one
group per row: `group_size=None`, "per output channel"); G = K // group_size groups (1 per channel). Every element
holds an unsigned code u, and

    W[n, k] = (u[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]

Codes are offset binary: u = q + 2**(bits - 1), where q is the signed value of compressed-tensors (and GPTQ, AWQ,
llm-compressor) in [-2**(bits-1), 2**(bits-1) - 1]; a symmetric scheme has q's zero point 0, i.e. zero code
2**(bits-1) (128 or 8), stored nowhere. In memory:

    qweight  uint8 [N, K]            bits=8: byte k of row n is u[n, k]
             uint8 [N, ceil(K / 2)]  bits=4: byte j of row n holds u[n, 2j] in its low nibble, u[n, 2j+1] in its high
                                     nibble (the high nibble of an odd K's last byte is 0 and never read)
    scales   fp16 | bf16 | fp32 [N, G]
    zeros    uint8 [N, G] zero codes (q's zero point + 2**(bits-1)), or None for a symmetric scheme

Why this layout: it is byte for byte the little-endian view of compressed-tensors' `pack-quantized` int32 words
(`weight_packed.view(torch.uint8)`, see compressed_tensors_format.py), so a checkpoint loads without a repack, and
rows are contiguous along K, so a GEMV lane reads 16 (int8) or 32 (int4) consecutive weights of one row with one
16-byte load and a warp reads 512 contiguous bytes of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = (4, 8)
MIN_GROUP_SIZE = 32  # the tile GEMM unpacks a group's int4 bytes into a tl.dot of >= 16 columns


@dataclass(frozen=True)
class QuantizedWeight:
    qweight: torch.Tensor  # uint8 [N, K] (8 bits) or [N, ceil(K / 2)] (4 bits): offset-binary codes
    scales: torch.Tensor  # fp16 / bf16 / fp32 [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G] zero codes; None: symmetric (zero code 2**(bits-1))
    bits: int  # 8 or 4
    group_size: int | None  # K columns per scale (a power of two >= 32 dividing K); None: one scale per row
    in_features: int  # K (a 4-bit row of ceil(K / 2) bytes does not say whether K is odd)

    def __post_init__(self) -> None:
        check_quantized_weight("weight", self)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): the dense weight's shape."""
        return self.qweight.shape[0], self.in_features

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size is None else self.in_features // self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def zero_code(self) -> int:
        """The code of q = 0: every group's zero code in a symmetric scheme."""
        return 1 << (self.bits - 1)

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams for this weight: codes, scales and zero codes."""
        zeros = 0 if self.zeros is None else self.zeros.nbytes
        return self.qweight.nbytes + self.scales.nbytes + zeros

    def to(self, device: torch.device | str) -> QuantizedWeight:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), zeros, self.bits, self.group_size,
                               self.in_features)


def code_columns(bits: int, in_features: int) -> int:
    """qweight's columns: bytes per row."""
    return in_features if bits == 8 else (in_features + 1) // 2


def check_quantized_weight(name: str, weight: QuantizedWeight) -> None:
    """Raise ValueError naming `name` and the offending field when `weight` breaks the layout above."""
    bits, group_size, in_features = weight.bits, weight.group_size, weight.in_features
    if bits not in BITS:
        raise ValueError(f"{name}.bits must be one of {BITS}, got {bits!r}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"{name}.in_features must be a positive int, got {in_features!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE \
                or group_size & (group_size - 1):
            raise ValueError(f"{name}.group_size must be None (per output channel) or a power of two >= "
                             f"{MIN_GROUP_SIZE}, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"{name}.group_size {group_size} does not divide in_features {in_features} (K must be "
                             f"a whole number of groups)")
    for field, tensor in (("qweight", weight.qweight), ("scales", weight.scales), ("zeros", weight.zeros)):
        if field == "zeros" and tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}.{field} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2 or not tensor.is_contiguous():
            raise ValueError(f"{name}.{field} must be a contiguous 2-D tensor, got shape {tuple(tensor.shape)} "
                             f"strides {tuple(tensor.stride())}")
        if tensor.device != weight.qweight.device:
            raise ValueError(f"{name}.{field} is on {tensor.device}, {name}.qweight on {weight.qweight.device}")
    N = weight.qweight.shape[0]
    groups = 1 if group_size is None else in_features // group_size
    expected = {"qweight": ((N, code_columns(bits, in_features)), (torch.uint8,)),
                "scales": ((N, groups), SCALE_DTYPES), "zeros": ((N, groups), (torch.uint8,))}
    for field, (shape, dtypes) in expected.items():
        tensor = getattr(weight, field)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.{field} has shape {tuple(tensor.shape)}, expected {shape} for a {bits}-bit "
                             f"[{N}, {in_features}] weight with group_size {group_size}")
        if tensor.dtype not in dtypes:
            raise ValueError(f"{name}.{field} has dtype {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if N < 1:
        raise ValueError(f"{name} needs N >= 1 output features, got qweight shape {tuple(weight.qweight.shape)}")


def unpack_codes(weight: QuantizedWeight) -> torch.Tensor:
    """The codes u as uint8 [N, K]."""
    if weight.bits == 8:
        return weight.qweight
    pairs = torch.stack((weight.qweight & 0xF, weight.qweight >> 4), dim=-1)  # [N, ceil(K/2), 2]
    return pairs.flatten(1)[:, :weight.in_features]


def dequantize_ref(weight: QuantizedWeight) -> torch.Tensor:
    """The dense weight [N, K] in the scales' dtype: (u - zero) * scale, rounded once, as compressed-tensors'
    `dequantize` computes it (u - zero is an integer below 256 in magnitude: exact in every scale dtype)."""
    N, K = weight.shape
    dtype = weight.scales.dtype
    codes = unpack_codes(weight).to(dtype).view(N, weight.num_groups, -1)  # [N, G, K // G]
    zeros = weight.zero_code if weight.zeros is None else weight.zeros.to(dtype)[:, :, None]
    return ((codes - zeros) * weight.scales[:, :, None]).view(N, K)
