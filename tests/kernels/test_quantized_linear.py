"""linear / ln_linear on QuantizedWeight (int8, int4 symmetric and asymmetric, per channel and grouped): the fused
GEMV (M <= 4) and tile GEMM kernels vs dequantize_ref + the dense references, at odd shapes, group boundaries, every
epilogue, forced split-K paths, in place; every input and output inside poisoned guard bands (launch counts:
tests/test_quantized_launch_count.py)."""

import pytest
import torch

from hayabusa.kernels.compressed_tensors_format import quantize_rtn
from hayabusa.kernels.gemv import GemvConfig
from hayabusa.kernels.gemv_quantized import launch_quantized_gemv
from hayabusa.kernels.linear import GemmConfig, linear, linear_ref, ln_linear, ln_linear_ref
from hayabusa.kernels.linear_quantized import launch_quantized_linear
from hayabusa.kernels.quantized_weight import QuantizedWeight

from devices import DEVICE
from tolerance import GuardRegistry, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# (bits, group_size, symmetric): issue 18's presets with groups small enough that K spans several, int4 with an
# odd K per channel (the last byte's high nibble is padding), asymmetric int8 per channel
SCHEMES = {"int8-channel": (8, None, True), "int8-g32": (8, 32, True), "int4-g32": (4, 32, True),
           "int4-g64-asym": (4, 64, False), "int4-channel-asym": (4, None, False),
           "int8-channel-asym": (8, None, False)}
# (M, N, K): every GEMV M, then tile-GEMM M; K of 3 to 20 groups of 32, below, inside and past a K-step
SHAPES = [(1, 37, 320), (2, 19, 192), (3, 50, 640), (4, 23, 128), (5, 41, 192), (17, 30, 320)]
ODD_K = 97  # per-channel schemes also run at an odd K


def make_inputs(M: int, N: int, K: int, dtype: torch.dtype, scheme: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    bits, group_size, symmetric = SCHEMES[scheme]
    # an offset per row, so asymmetric zero points differ from the symmetric code
    weight = (torch.randn(N, K, generator=gen) + torch.rand(N, 1, generator=gen)) / K**0.5
    tensors = dict(x=torch.randn(M, K, generator=gen) * 3 + 2, bias=torch.randn(N, generator=gen),
                   residual=torch.randn(M, N, generator=gen), ln_weight=1 + 0.5 * torch.randn(K, generator=gen),
                   ln_bias=torch.randn(K, generator=gen))
    inputs = {name: t.to(DEVICE, dtype) for name, t in tensors.items()}
    inputs["weight"] = quantize_rtn(weight.to(DEVICE, dtype), bits, group_size, symmetric)
    return inputs


def guarded_weight(weight: QuantizedWeight, guards: GuardRegistry) -> QuantizedWeight:
    """The same weight with codes, scales and zero codes inside guard bands: a read past any of them is caught."""
    zeros = None if weight.zeros is None else guards.copy_of(weight.zeros, "zeros")
    return QuantizedWeight(guards.copy_of(weight.qweight, "qweight"), guards.copy_of(weight.scales, "scales"), zeros,
                           weight.bits, weight.group_size, weight.in_features)


def shapes_for(scheme: str) -> list[tuple[int, int, int]]:
    if SCHEMES[scheme][1] is not None:
        return SHAPES
    return SHAPES + [(2, 29, ODD_K), (6, 29, ODD_K)]


CASES = [(scheme, shape) for scheme in SCHEMES for shape in shapes_for(scheme)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,shape", CASES, ids=[f"{s}-{m}x{n}x{k}" for s, (m, n, k) in CASES])
def test_quantized_ln_linear_matches_dequantized_reference(scheme, shape, dtype, guards):
    M, N, K = shape
    t = make_inputs(M, N, K, dtype, scheme)
    weight = guarded_weight(t["weight"], guards)
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    expected = ln_linear_ref(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    stream = guards.copy_of(t["residual"], "residual stream")  # out is the residual: the in-place update
    result = ln_linear(t["x"], *ln, weight, bias=t["bias"], residual=stream, activation="gelu", out=stream)
    guards.check()
    assert result.data_ptr() == stream.data_ptr()
    assert_close(stream, expected, dtype)


# (bias, activation, residual): every epilogue combination
EPILOGUES = [(False, None, False), (True, None, False), (False, "gelu", False), (False, None, True),
             (True, "gelu", True)]


@pytest.mark.parametrize("M", [1, 4, 9])
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_quantized_linear_epilogues(has_bias, activation, has_residual, M, guards):
    dtype = torch.float16
    t = make_inputs(M, 26, 256, dtype, "int4-g64-asym", seed=M)
    bias = t["bias"] if has_bias else None
    residual = t["residual"] if has_residual else None
    out = guards.new((M, 26), dtype, DEVICE)
    linear(t["x"], guarded_weight(t["weight"], guards), bias=bias, residual=residual, activation=activation, out=out)
    guards.check()
    assert_close(out, linear_ref(t["x"], t["weight"], bias=bias, residual=residual, activation=activation), dtype)


def test_the_dequantized_reference_is_the_dense_reference_on_dequantize_ref():
    t = make_inputs(3, 21, 128, torch.float32, "int4-g32")
    from hayabusa.kernels.quantized_weight import dequantize_ref

    dense = dequantize_ref(t["weight"])
    assert torch.equal(linear_ref(t["x"], t["weight"], bias=t["bias"]), linear_ref(t["x"], dense, bias=t["bias"]))


# Forced configs: GEMV programs sharing tiles (units of a ragged last K-step, tiles over 2 and 3 programs); GEMM split-K
# over group-sized K-tiles with ragged M and N, and grouped M-tile order.
GEMV_SHARES = [(GemvConfig(1, 16, 256, 2, 16), (1, 37, 320), "int4-g32"),
               (GemvConfig(2, 16, 256, 4, 16), (2, 33, 576), "int8-g32"),
               (GemvConfig(4, 8, 256, 7, 8), (3, 29, 640), "int4-g64-asym")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config,shape,scheme", GEMV_SHARES, ids=["ragged_2_programs", "4_programs", "7_programs"])
def test_quantized_gemv_shared_tiles(config, shape, scheme, dtype, guards):
    M, N, K = shape
    t = make_inputs(M, N, K, dtype, scheme, seed=2)
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    expected = ln_linear_ref(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    out = guards.new((M, N), dtype, DEVICE)
    launch_quantized_gemv(config, t["x"], guarded_weight(t["weight"], guards), t["bias"], t["residual"], "gelu", out,
                          ln)
    guards.check()
    assert_close(out, expected, dtype)


GEMM_CONFIGS = [
    (GemmConfig(block_m=16, block_n=16, block_k=32, split_k=3, group_m=1, num_warps=4, num_stages=2), (3, 40, 320),
     "int4-g32"),
    (GemmConfig(block_m=16, block_n=32, block_k=64, split_k=1, group_m=2, num_warps=4, num_stages=2), (37, 50, 192),
     "int4-g64-asym"),
    (GemmConfig(block_m=16, block_n=16, block_k=32, split_k=2, group_m=1, num_warps=4, num_stages=2), (7, 9, ODD_K),
     "int4-channel-asym"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape,scheme", GEMM_CONFIGS, ids=["split3", "grouped_m", "split2_odd_k"])
def test_quantized_gemm_config_paths(config, shape, scheme, dtype, guards):
    M, N, K = shape
    t = make_inputs(M, N, K, dtype, scheme, seed=3)
    expected = linear_ref(t["x"], t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    out = guards.new((M, N), dtype, DEVICE)
    launch_quantized_linear(config, t["x"], guarded_weight(t["weight"], guards), t["bias"], t["residual"], "gelu",
                            out)
    guards.check()
    assert_close(out, expected, dtype)


def test_quantized_linear_rejects_bad_arguments():
    t = make_inputs(2, 16, 64, torch.float16, "int4-g32")
    weight = t["weight"]
    with pytest.raises(ValueError, match=r"weight has shape \(16, 64\), expected \[N, 63\]"):
        linear(t["x"][:, :63].contiguous(), weight)
    with pytest.raises(ValueError, match="weight is on meta"):
        linear(t["x"], QuantizedWeight(weight.qweight.to("meta"), weight.scales.to("meta"), None, 4, 32, 64))
    with pytest.raises(ValueError, match=r"weight.scales has shape \(16, 3\), expected \(16, 2\)"):
        QuantizedWeight(weight.qweight, weight.scales[:, :1].repeat(1, 3), None, 4, 32, 64)
    with pytest.raises(ValueError, match="weight.qweight has dtype torch.int8, expected torch.uint8"):
        QuantizedWeight(weight.qweight.view(torch.int8), weight.scales, None, 4, 32, 64)
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        QuantizedWeight(torch.zeros(16, 48, dtype=torch.uint8), torch.ones(16, 1), None, 4, 64, 96)
    with pytest.raises(ValueError, match="group_size must be None .* or a power of two >= 32, got 48"):
        QuantizedWeight(torch.zeros(16, 48, dtype=torch.uint8), torch.ones(16, 2), None, 4, 48, 96)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedWeight(weight.qweight, weight.scales, None, 3, 32, 64)
