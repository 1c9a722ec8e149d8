"""kernels/cpu_linear.py: each weight format packed for its CPU kernel (the kind is asserted, so a weight that
silently took another path fails), then linear / ln_linear / fused_mlp against dequantize_ref + the dense references
at odd M, every epilogue, in place; fp32 within 1e-5, bf16 / fp16 within 1e-2."""

import pytest
import torch

from hayabusa.kernels import cpu_linear
from hayabusa.kernels._reference_gemm import ONEDNN_MIN_FP32_WEIGHT, onednn_fuses
from hayabusa.kernels.compressed_tensors_format import quantize_rtn
from hayabusa.kernels.cpu_linear import PackedLinearWeight, pack_linear_weight
from hayabusa.kernels.linear import linear_ref, ln_linear_ref

from tolerance import assert_close

EPS = 1e-5
BF16_NATIVE = onednn_fuses(torch.bfloat16)
# name -> (activation dtype, (bits, group_size, symmetric) or None for dense, N, K, the kind it must pack to)
CASES = {
    "bf16-dense": (torch.bfloat16, None, 48, 200, "onednn"),
    "int4-g32-asym": (torch.bfloat16, (4, 32, False), 64, 224, "int4pack"),
    "int4-g128": (torch.bfloat16, (4, 128, True), 32, 384, "int4pack"),
    "int4-g512": (torch.bfloat16, (4, 512, True), 16, 1024, "int4pack"),  # run as groups of 256, scales repeated
    "int4-channel-asym": (torch.bfloat16, (4, None, False), 32, 192, "int4pack"),  # groups of 64
    "int4-fp16": (torch.float16, (4, 64, False), 16, 128, "int4pack"),
    "int8-channel": (torch.bfloat16, (8, None, True), 40, 160, "int8pack"),
    "int8-channel-asym": (torch.bfloat16, (8, None, False), 40, 176, "int8pack"),
    "int8-odd-k": (torch.bfloat16, (8, None, False), 40, 161, "onednn"),  # _weight_int8pack_mm needs K % 16 == 0
    "int8-channel-fp16": (torch.float16, (8, None, False), 24, 96, "int8pack"),
    # no int kernel: dequantized once into the activations' dtype, packed dense
    "int8-g32": (torch.bfloat16, (8, 32, True), 40, 128, "onednn"),
    "int4-n-not-16": (torch.bfloat16, (4, 32, True), 40, 128, "onednn"),
    "int4-odd-k-channel": (torch.bfloat16, (4, None, True), 32, 97, "onednn"),
    "int4-fp32": (torch.float32, (4, 32, False), 64, 128, None),  # small fp32: linear_ref's own path
}
# (bias, activation, residual)
EPILOGUES = [(False, None, False), (True, None, False), (False, "gelu", False), (True, None, True),
             (True, "gelu", True)]


def make_weight(case: str, N: int, K: int, seed: int):
    dtype, scheme, _, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    # an offset per row, so asymmetric zero points differ from the symmetric code
    weight = ((torch.randn(N, K, generator=gen) + torch.rand(N, 1, generator=gen)) / K**0.5).to(dtype)
    return weight if scheme is None else quantize_rtn(weight, *scheme)


def make(case: str, M: int, seed: int = 0):
    dtype, _, N, K, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed + 100)
    tensors = dict(x=torch.randn(M, K, generator=gen) * 3 + 2, bias=torch.randn(N, generator=gen),
                   residual=torch.randn(M, N, generator=gen), ln_weight=1 + 0.5 * torch.randn(K, generator=gen),
                   ln_bias=torch.randn(K, generator=gen))
    return make_weight(case, N, K, seed), {name: t.to(dtype) for name, t in tensors.items()}


def packed(case: str, weight) -> PackedLinearWeight | torch.Tensor:
    dtype, _, _, _, kind = CASES[case]
    if kind == "onednn" and not onednn_fuses(dtype):
        pytest.skip(f"oneDNN does not multiply {dtype} on this CPU")
    result = pack_linear_weight(weight, dtype)
    if kind is None:
        assert isinstance(result, torch.Tensor)
    else:
        assert isinstance(result, PackedLinearWeight) and result.kind == kind
    return result


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(str(p) for p in e))
@pytest.mark.parametrize("case", list(CASES))
def test_packed_linear_matches_dequantized_reference(case, epilogue, M):
    weight, t = make(case, M)
    has_bias, activation, has_residual = epilogue
    kwargs = dict(bias=t["bias"] if has_bias else None, residual=t["residual"].clone() if has_residual else None,
                  activation=activation)
    expected = linear_ref(t["x"], weight, **kwargs)
    out = kwargs["residual"] if has_residual else torch.full_like(expected, float("nan"))
    result = cpu_linear.linear(t["x"], packed(case, weight), **kwargs, out=out)  # in place on the residual
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, expected, CASES[case][0])


@pytest.mark.parametrize("case", ["bf16-dense", "int4-g32-asym", "int8-channel-asym", "int4-fp32"])
def test_packed_ln_linear_and_mlp_match_references(case):
    weight, t = make(case, 5)
    dtype, _, N, K, _ = CASES[case]
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    expected = ln_linear_ref(t["x"], *ln, weight, bias=t["bias"], activation="gelu")
    assert_close(cpu_linear.ln_linear(t["x"], *ln, packed(case, weight), bias=t["bias"], activation="gelu"),
                 expected, dtype)
    w_out = make_weight(case, K, N, seed=1)  # the MLP: [M, K] -> [M, N] -> [M, K]
    # fused_mlp_ref's two steps (it takes dense weights only)
    expected = linear_ref(ln_linear_ref(t["x"], *ln, weight, activation="gelu"), w_out, residual=t["x"])
    w_out = pack_linear_weight(w_out, dtype)  # its own kind: K = N may not suit the case's kernel
    assert_close(cpu_linear.fused_mlp(t["x"], *ln, packed(case, weight), w_out), expected, dtype)


def test_large_fp32_weight_is_packed_and_exact():
    """fp32 weights from ONEDNN_MIN_FP32_WEIGHT elements run oneDNN's blocked layout: the exact path's 1e-5."""
    N, K = 2048, ONEDNN_MIN_FP32_WEIGHT // 2048
    gen = torch.Generator().manual_seed(3)
    weight, x, residual = torch.randn(N, K, generator=gen) / K**0.5, torch.randn(2, K, generator=gen), \
        torch.randn(2, N, generator=gen)
    result = pack_linear_weight(weight, torch.float32)
    if not onednn_fuses(torch.float32):
        pytest.skip("no oneDNN in this torch")
    assert isinstance(result, PackedLinearWeight) and result.kind == "onednn"
    assert_close(cpu_linear.linear(x, result, residual=residual, activation="gelu"),
                 linear_ref(x, weight, residual=residual, activation="gelu"), torch.float32)


def test_bytes_streamed_follow_the_format():
    for case, per_weight in (("bf16-dense", 2), ("int8-channel", 1), ("int4-g128", 0.5)):
        weight, _ = make(case, 1)
        N, K = weight.shape
        assert N * K * per_weight <= packed(case, weight).nbytes <= N * K * per_weight * 1.1


def test_zero_rows():
    weight, t = make("int4-g32-asym", 1)
    result = cpu_linear.linear(t["x"][:0], packed("int4-g32-asym", weight))
    assert result.shape == (0, weight.shape[0]) and result.dtype == torch.bfloat16


def test_bad_arguments_are_named():
    weight, t = make("int8-channel", 2)
    pack = packed("int8-channel", weight)
    with pytest.raises(ValueError, match="x has dtype torch.float32"):
        cpu_linear.linear(t["x"].float(), pack)
    with pytest.raises(ValueError, match="expected \\[N, 144\\]"):
        cpu_linear.linear(t["x"][:, :144].contiguous(), pack)
    with pytest.raises(ValueError, match="residual has shape"):
        cpu_linear.linear(t["x"], pack, residual=t["residual"][:, :3].contiguous())
    with pytest.raises(ValueError, match="activation must be one of"):
        cpu_linear.linear(t["x"], pack, activation="relu")
    with pytest.raises(ValueError, match="cannot run with torch.bfloat16 activations"):
        pack_linear_weight(torch.randn(4, 8), torch.bfloat16)
