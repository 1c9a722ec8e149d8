"""Round-to-nearest quantization with compressed-tensors' arithmetic, and its `pack-quantized` tensors <->
QuantizedWeight.

`quantize_rtn` gives the numbers llm-compressor's QuantizationModifier (no GPTQ/AWQ) writes for the weight-only
integer schemes, compressed-tensors 0.20 (`calculate_qparams`, `quantize`, with the "memoryless_minmax" observer's
per-group min/max): the same torch operations in the same order and dtype, so the results are equal bit for bit.

    preset        bits  group_size  symmetric    (llm-compressor scheme name)
    W8A16         8     128         True
    W4A16         4     128         True
    W4A16_ASYM    4     128         False
    int8 channel  8     None        True         (strategy "channel", what torch's packed int8 CPU kernel computes)

compressed-tensors' `pack-quantized` format (what llm-compressor writes for weight-only int schemes), per Linear:

    weight_packed      int32 [N, ceil(K * bits / 32)]: q + 2**(bits-1) packed densely, element k at bits
                       bits*k .. bits*k + bits - 1 of the row's bit string, low bits of a word first
    weight_scale       float [N, G] (the model's dtype): scale per group ([N, 1] per channel)
    weight_zero_point  int32 [ceil(N * bits / 32), G], asymmetric only: the signed zero points, packed as above
                       along N (packed_dim=0)
    weight_shape       int [2]: (N, K)

On a little-endian host `weight_packed.view(torch.uint8)[:, :code_columns]` is QuantizedWeight.qweight exactly (a
row of 8 or 2 codes per 8 or 4 bytes), so loading is a view; zero points are unpacked (they are [N, G], tiny).
"""

from __future__ import annotations

import sys

import torch

from .quantized_weight import MIN_GROUP_SIZE, QuantizedWeight, code_columns


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """weight [N, K] (fp16 / bf16 / fp32) -> its round-to-nearest QuantizedWeight, scales in weight's dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    N, K = weight.shape
    if group_size is not None and (K % group_size or group_size < MIN_GROUP_SIZE or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be None or a power of two >= {MIN_GROUP_SIZE} dividing K = {K}, "
                         f"got {group_size!r}")
    groups = weight.reshape(N, 1 if group_size is None else K // group_size, -1)  # [N, G, K // G]
    q_min = torch.tensor(-(2.0 ** bits) / 2, device=weight.device)  # fp32 scalars, as calculate_range makes them
    q_max = torch.tensor(2.0 ** bits / 2 - 1, device=weight.device)
    bit_range = q_max - q_min

    # calculate_qparams: the observed range always holds 0
    min_vals = torch.min(groups.amin(dim=-1), torch.zeros(1, dtype=weight.dtype, device=weight.device))  # [N, G]
    max_vals = torch.max(groups.amax(dim=-1), torch.zeros(1, dtype=weight.dtype, device=weight.device))
    if symmetric:
        scales = torch.max(min_vals.abs(), max_vals.abs()) / (bit_range.to(weight.dtype) / 2)
        zero_points = torch.zeros_like(scales)
    else:
        scales = (max_vals - min_vals) / bit_range.to(weight.dtype)
        zero_points = torch.clamp(q_min - min_vals / scales, q_min, q_max)  # from the scale before eps below
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(scales.dtype).eps, dtype=scales.dtype,
                                                   device=weight.device), scales)
    zero_points = torch.round(torch.clamp(zero_points, -128, 127)).to(torch.int8)

    # quantize: x / scale + zero point, clamped, then rounded half to even
    scaled = groups / scales[:, :, None]
    if not symmetric:
        scaled += zero_points.to(weight.dtype)[:, :, None]
    q = torch.round(torch.clamp(scaled, q_min, q_max)).to(torch.int8).view(N, K)
    offset = 1 << (bits - 1)
    zeros = None if symmetric else (zero_points.to(torch.int16) + offset).to(torch.uint8)
    return QuantizedWeight(pack_codes((q.to(torch.int16) + offset).to(torch.uint8), bits), scales.contiguous(), zeros,
                           bits, group_size, K)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> QuantizedWeight.qweight (for 4 bits: two per byte, the even column in the low nibble)."""
    if bits == 8:
        return codes.contiguous()
    N, K = codes.shape
    if K % 2:
        codes = torch.cat((codes, codes.new_zeros(N, 1)), dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def from_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor,
                        bits: int, group_size: int | None,
                        weight_zero_point: torch.Tensor | None = None) -> QuantizedWeight:
    """One Linear's compressed-tensors `pack-quantized` tensors -> QuantizedWeight (codes by view, no repack).

    group_size: the scheme's (None for strategy "channel"); weight_zero_point only for an asymmetric scheme.
    """
    N, K = (int(v) for v in weight_shape.tolist())
    words = -(-K * bits // 32)
    if weight_packed.dtype != torch.int32 or tuple(weight_packed.shape) != (N, words):
        raise ValueError(f"weight_packed is {weight_packed.dtype} {tuple(weight_packed.shape)}, expected int32 "
                         f"{(N, words)} for a {bits}-bit weight of shape {(N, K)}")
    codes = _int32_bytes(weight_packed)[:, :code_columns(bits, K)].contiguous()
    zeros = None
    if weight_zero_point is not None:
        groups = weight_scale.shape[1]
        zero_words = -(-N * bits // 32)
        if weight_zero_point.dtype != torch.int32 or tuple(weight_zero_point.shape) != (zero_words, groups):
            raise ValueError(f"weight_zero_point is {weight_zero_point.dtype} {tuple(weight_zero_point.shape)}, "
                             f"expected int32 {(zero_words, groups)} (packed along N)")
        zero_bytes = _int32_bytes(weight_zero_point.t().contiguous())  # [G, bytes along N]
        zeros = _unpacked_rows(zero_bytes, bits, N).t().contiguous()  # [N, G]
    return QuantizedWeight(codes, weight_scale.contiguous(), zeros, bits, group_size, K)


def to_pack_quantized(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> one Linear's compressed-tensors `pack-quantized` tensors (the inverse of
    from_pack_quantized): weight_packed, weight_scale, weight_shape and, asymmetric only, weight_zero_point."""
    N, K = weight.shape
    tensors = {"weight_packed": _packed_int32(weight.qweight, -(-K * weight.bits // 32)),
               "weight_scale": weight.scales, "weight_shape": torch.tensor([N, K])}
    if weight.zeros is not None:
        zero_rows = pack_codes(weight.zeros.t(), weight.bits)  # [G, N-packed bytes]
        tensors["weight_zero_point"] = _packed_int32(zero_rows, -(-N * weight.bits // 32)).t().contiguous()
    return tensors


def _int32_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> its little-endian bytes, uint8 [R, 4 W]."""
    as_bytes = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        as_bytes = as_bytes.view(*words.shape, 4).flip(-1).flatten(1)
    return as_bytes


def _packed_int32(code_bytes: torch.Tensor, words: int) -> torch.Tensor:
    """uint8 [R, B] (B <= 4 words) -> int32 [R, words], zero-padded, little-endian."""
    R, B = code_bytes.shape
    padded = torch.zeros(R, 4 * words, dtype=torch.uint8, device=code_bytes.device)
    padded[:, :B] = code_bytes
    if sys.byteorder == "big":
        padded = padded.view(R, words, 4).flip(-1).flatten(1).contiguous()
    return padded.view(torch.int32)


def _unpacked_rows(code_bytes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [R, B] packed codes -> uint8 [R, count] codes."""
    if bits == 8:
        return code_bytes[:, :count]
    return torch.stack((code_bytes & 0xF, code_bytes >> 4), dim=-1).flatten(1)[:, :count]
