"""Skinny-M GEMV and ln_linear: kernels vs their torch references at odd shapes, every M up to the crossover and past
it, forced split-K paths (ragged and empty splits), in-place residuals; every output inside poisoned guard bands."""

import pytest
import torch

from hayabusa.kernels.gemv import GEMV_MAX_M, GemvConfig, choose_gemv_config, launch_gemv
from hayabusa.kernels.linear import choose_linear, linear, linear_ref, ln_linear, ln_linear_ref

from devices import DEVICE
from tolerance import Guarded, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# (M, N, K): every M of the GEMV, then the tile path (M = 5, 17: a separate LayerNorm launch); primes and
# non-powers of two, K below, at and past one 512-wide step (1030 leaves a ragged last step).
SHAPES = [(1, 97, 80), (2, 33, 1030), (3, 160, 97), (4, 50, 600), (5, 41, 160), (17, 80, 97)]


def make_inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # x with an offset mean and a spread, as a residual stream has, so the LayerNorm statistics matter
    tensors = dict(x=torch.randn(M, K, generator=gen) * 3 + 2, weight=torch.randn(N, K, generator=gen) / K**0.5,
                   bias=torch.randn(N, generator=gen), residual=torch.randn(M, N, generator=gen),
                   ln_weight=1 + 0.5 * torch.randn(K, generator=gen), ln_bias=torch.randn(K, generator=gen))
    return {name: t.to(DEVICE, dtype) for name, t in tensors.items()}


def guarded_out(M: int, N: int, dtype: torch.dtype, fill: torch.Tensor | None = None) -> Guarded:
    out = Guarded((M, N), dtype, DEVICE)
    if fill is not None:
        out.tensor.copy_(fill)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_ln_linear_matches_reference(M, N, K, dtype):
    t = make_inputs(M, N, K, dtype)
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    out = guarded_out(M, N, dtype)
    expected = ln_linear_ref(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    result = ln_linear(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu",
                       out=out.tensor)
    assert result.data_ptr() == out.tensor.data_ptr()
    assert_close(out.tensor, expected, dtype)
    out.check()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SHAPES[:4])
def test_gemv_linear_matches_reference(M, N, K, dtype):
    assert choose_linear(M, N, K, dtype, torch.device(DEVICE)).gemv is not None
    t = make_inputs(M, N, K, dtype, seed=1)
    for bias, activation, residual in ((None, None, None), (t["bias"], None, t["residual"])):
        out = guarded_out(M, N, dtype)
        linear(t["x"], t["weight"], bias=bias, residual=residual, activation=activation, out=out.tensor)
        assert_close(out.tensor, linear_ref(t["x"], t["weight"], bias=bias, residual=residual), dtype)
        out.check()


# Forced GEMV configs: split-K with a ragged last K-step (1030 = 2 x 512 + 6) in 2 and 3 splits, and 4 splits of 3
# K-steps (the last split has none: it must still take its ticket and add nothing).
SPLIT_CASES = [(GemvConfig(1, 16, 512, 2, 16), (1, 37, 1030)), (GemvConfig(2, 16, 128, 3, 16), (2, 33, 1030)),
               (GemvConfig(4, 8, 128, 4, 8), (3, 29, 300))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", SPLIT_CASES, ids=["split2_ragged", "split3_ragged", "split4_one_empty"])
def test_gemv_split_k_with_layer_norm_and_in_place_residual(config, shape, dtype):
    M, N, K = shape
    t = make_inputs(M, N, K, dtype, seed=2)
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    expected = ln_linear_ref(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    stream = guarded_out(M, N, dtype, fill=t["residual"])  # out is the residual: the in-place update
    launch_gemv(config, t["x"], t["weight"], t["bias"], stream.tensor, "gelu", stream.tensor, ln)
    assert_close(stream.tensor, expected, dtype)
    stream.check()


def test_crossover_and_configs():
    h200 = dict(num_sms=132, shared_memory_bytes=232448)
    from hayabusa.kernels._launch import DeviceLimits

    limits = DeviceLimits(**h200)
    assert GEMV_MAX_M == 4
    for M in (1, 2, 3, 4):
        assert choose_linear(M, 2560, 2560, torch.float16, torch.device(DEVICE)).gemv is not None
    assert choose_linear(5, 2560, 2560, torch.float16, torch.device(DEVICE)).gemm is not None
    # the 2.7B widths on an H200: every weight-row block is a program; K is split only where N is narrow
    assert choose_gemv_config(1, 7680, 2560, limits).split_k == 1  # qkv: 480 programs
    dense = choose_gemv_config(1, 2560, 2560, limits)  # 160 blocks < 2 per SM: split K in two
    assert dense.split_k == 2 and dense.block_n == 16 and dense.num_warps == 16
    assert choose_gemv_config(3, 2560, 10240, limits).block_m == 4
    assert choose_gemv_config(1, 10, 7, limits).split_k == 1  # one K-step cannot be split


def test_ln_linear_rejects_bad_arguments():
    t = make_inputs(2, 16, 24, torch.float16)
    cases = [(dict(ln_weight=t["ln_weight"][:-1]), r"ln_weight has shape \(23,\), expected \(24,\)"),
             (dict(ln_bias=t["ln_bias"].float()), "ln_bias has dtype torch.float32"),
             (dict(eps=0.0), "eps must be a positive float"),
             (dict(weight=t["weight"][:, :-1].contiguous()), r"weight has shape \(16, 23\), expected \[N, 24\]")]
    for overrides, message in cases:
        args = dict(x=t["x"], ln_weight=t["ln_weight"], ln_bias=t["ln_bias"], eps=EPS, weight=t["weight"]) | overrides
        for fn in (ln_linear, ln_linear_ref):
            with pytest.raises(ValueError, match=message):
                fn(**args)
