"""QuantizedWeight's numbers and layout: quantize_rtn gives compressed-tensors' round-to-nearest results bit for bit,
pack-quantized tensors convert both ways exactly (codes by view), and dequantize_ref is compressed-tensors'
decompression. The comparisons with the `compressed-tensors` package run where it is installed; the rest always."""

import pytest
import torch

from hayabusa.kernels.compressed_tensors_format import from_pack_quantized, quantize_rtn, to_pack_quantized
from hayabusa.kernels.quantized_weight import QuantizedWeight, dequantize_ref, unpack_codes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (bits, group_size, symmetric): W8A16, W4A16, W4A16_ASYM, int8 channel, and the other combinations
SCHEMES = [(8, 128, True), (4, 128, True), (4, 128, False), (8, None, True), (4, None, False), (8, 32, False),
           (4, None, True)]


def make_weight(N: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=gen) * 0.05 + 0.01
    weight[3] = 0  # an all-zero row: a zero scale becomes the dtype's eps
    weight[5, :K // 2] = 0.3  # a one-signed group: the zero point is clamped
    return weight.to(dtype)


def compressed_tensors_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> tuple:
    """What llm-compressor's QuantizationModifier writes (no calibration data needed for weights): the
    memoryless_minmax observer's per-group min/max (llmcompressor.observers.min_max._get_min_max over
    flatten_for_calibration's [1, N, G, group] view), compressed-tensors' calculate_qparams, then its
    pack-quantized compressor. Returns (the compressed tensors, their decompression)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    observed = (weight.unflatten(-1, (-1, group_size)) if group_size else weight.unsqueeze(-2)).unsqueeze(0)
    scale, zero_point = calculate_qparams(torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1)), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
    return packed, PackedQuantizationCompressor.decompress(packed, scheme)["weight"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES)
def test_rtn_and_packing_equal_compressed_tensors(bits, group_size, symmetric, dtype):
    pytest.importorskip("compressed_tensors")
    K = 384 if group_size else 97  # odd K per channel: int4 rows end in half a byte
    weight = make_weight(19, K, dtype)
    packed, decompressed = compressed_tensors_rtn(weight, bits, group_size, symmetric)
    quantized = quantize_rtn(weight, bits, group_size, symmetric)

    ours = to_pack_quantized(quantized)
    assert sorted(ours) == sorted(packed)
    for name, tensor in packed.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    loaded = from_pack_quantized(packed["weight_packed"], packed["weight_scale"], packed["weight_shape"], bits,
                                 group_size, packed.get("weight_zero_point"))
    assert torch.equal(loaded.qweight, quantized.qweight) and torch.equal(loaded.scales, quantized.scales)
    assert (loaded.zeros is None) == symmetric and (symmetric or torch.equal(loaded.zeros, quantized.zeros))
    assert torch.equal(dequantize_ref(loaded), decompressed)


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES)
def test_rtn_round_trip_error_and_layout(bits, group_size, symmetric):
    K = 256 if group_size else 97
    weight = make_weight(11, K, torch.float32, seed=1)
    quantized = quantize_rtn(weight, bits, group_size, symmetric)
    codes = unpack_codes(quantized)
    assert codes.shape == (11, K) and int(codes.max()) < 2**bits
    if bits == 4:  # two codes a byte, the even column in the low nibble
        assert quantized.qweight.shape == (11, (K + 1) // 2)
        assert torch.equal(quantized.qweight[:, 1] & 0xF, codes[:, 2]) and torch.equal(quantized.qweight[:, 1] >> 4,
                                                                                        codes[:, 3])
    # round to nearest: every weight within half a step (its group's scale) of its dequantized value
    scales = quantized.scales.repeat_interleave(K // quantized.num_groups, dim=1)
    error = (dequantize_ref(quantized) - weight).abs()
    assert bool((error <= scales * 0.5001).all())  # half a step: the extremes of a symmetric range are clamped
    if symmetric:
        assert quantized.zeros is None
        assert torch.equal(codes[3], torch.full((K,), 2 ** (bits - 1), dtype=torch.uint8))  # the zero row is q = 0
    assert to_pack_quantized(quantized)["weight_packed"].shape == (11, -(-K * bits // 32))
    restored = from_pack_quantized(**{name: tensor for name, tensor in to_pack_quantized(quantized).items()},
                                   bits=bits, group_size=group_size)
    assert torch.equal(restored.qweight, quantized.qweight)


def test_conversion_errors_name_the_tensor():
    quantized = quantize_rtn(make_weight(8, 64, torch.float16), 4, 32, False)
    tensors = to_pack_quantized(quantized)
    with pytest.raises(ValueError, match=r"weight_packed is torch.int32 \(8, 8\), expected int32 \(8, 16\)"):
        from_pack_quantized(tensors["weight_packed"], tensors["weight_scale"], tensors["weight_shape"], 8, 32)
    with pytest.raises(ValueError, match="weight_zero_point is .* expected int32 \\(1, 2\\)"):
        from_pack_quantized(tensors["weight_packed"], tensors["weight_scale"], tensors["weight_shape"], 4, 32,
                            tensors["weight_zero_point"][:, :1].contiguous())
    with pytest.raises(ValueError, match="group_size must be None or a power of two >= 32 dividing K = 64"):
        quantize_rtn(make_weight(8, 64, torch.float16), 4, 128, True)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_rtn(make_weight(8, 64, torch.float16), 2, None, True)
    with pytest.raises(ValueError, match="weight.zeros has dtype torch.int8"):
        QuantizedWeight(quantized.qweight, quantized.scales, quantized.zeros.view(torch.int8), 4, 32, 64)
