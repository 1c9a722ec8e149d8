"""Skinny-M GEMV and ln_linear: kernels vs their torch references at odd shapes, every M up to the crossover and past
it, forced persistent configs whose programs share tiles, in-place residuals; every output inside poisoned guard
bands."""

import pytest
import torch

from hayabusa.kernels._launch import DeviceLimits
from hayabusa.kernels.gemv import GEMV_MAX_M, GemvConfig, choose_gemv_config, launch_gemv, work_shares
from hayabusa.kernels.linear import choose_linear, linear, linear_ref, ln_linear, ln_linear_ref

from devices import DEVICE, FULL_SHAPES
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


# Forced GEMV configs whose programs share tiles: a ragged last K-step (1030 = 2 x 512 + 6) with tiles over 2 programs,
# tiles over 3 and 4 programs (27 units in 7 shares), one unit per program, and tiles and K-steps that fit exactly.
SHARED_CASES = [(GemvConfig(1, 16, 512, 5, 16), (1, 37, 1030)), (GemvConfig(2, 16, 128, 7, 16), (2, 33, 1030)),
                (GemvConfig(4, 8, 128, 12, 8), (3, 29, 300)), (GemvConfig(1, 16, 64, 5, 16), (1, 48, 256))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", SHARED_CASES, ids=["ragged_2", "3_and_4", "one_unit_each", "even"])
def test_gemv_shared_tiles_with_layer_norm_and_in_place_residual(config, shape, dtype):
    M, N, K = shape
    t = make_inputs(M, N, K, dtype, seed=2)
    ln = (t["ln_weight"], t["ln_bias"], EPS)
    expected = ln_linear_ref(t["x"], *ln, t["weight"], bias=t["bias"], residual=t["residual"], activation="gelu")
    stream = guarded_out(M, N, dtype, fill=t["residual"])  # out is the residual: the in-place update
    launch_gemv(config, t["x"], t["weight"], t["bias"], stream.tensor, "gelu", stream.tensor, ln)
    assert_close(stream.tensor, expected, dtype)
    stream.check()


def test_work_shares_cover_each_unit_once():
    """Program p takes units p * units // programs onwards; a tile is shared where a share starts inside it."""
    config = GemvConfig(2, 16, 128, 7, 16)
    assert work_shares(config, 33, 1030) == (27, 6)  # 3 tiles x 9 K-steps; shares start at 3, 7, 11, 15, 19, 23
    assert work_shares(GemvConfig(1, 16, 64, 3, 16), 48, 256) == (12, 0)  # 3 tiles x 4 K-steps: starts at 4, 8
    with pytest.raises(ValueError, match="needs 1 to 12 programs"):
        t = make_inputs(1, 48, 256, torch.float32)
        launch_gemv(GemvConfig(1, 16, 64, 13, 16), t["x"], t["weight"], None, None, None, guarded_out(1, 48,
                    torch.float32).tensor)


def test_crossover_and_configs():
    limits = DeviceLimits(num_sms=132, shared_memory_bytes=232448)
    assert GEMV_MAX_M == 4
    for M in (1, 2, 3, 4):
        assert choose_linear(M, 2560, 2560, torch.float16, torch.device(DEVICE)).gemv is not None
    assert choose_linear(5, 2560, 2560, torch.float16, torch.device(DEVICE)).gemm is not None
    # the 2.7B widths on an H200: 2 persistent programs per SM, each >= 4 units (K-steps of 16 rows)
    for M, N, K in ((1, 7680, 2560), (1, 2560, 2560), (2, 10240, 2560), (4, 2560, 10240), (1, 32000, 2560)):
        config = choose_gemv_config(M, N, K, 2, limits)
        units, _ = work_shares(config, N, K)
        assert config.programs == 2 * 132 and units >= 4 * config.programs, (M, N, K, config)
        assert config.block_n == 16 and config.num_warps == 16 and config.block_k * 2 in (512, 256)
    assert choose_gemv_config(3, 2560, 10240, 2, limits).block_m == 4
    assert choose_gemv_config(1, 10, 7, 2, limits).programs == 1  # one unit of work: one program


# The 2.7B model's linear layers as the decode step calls them: (N, K, LayerNorm fused, bias, GELU, residual).
MODEL_LINEARS = {"qkv": (7680, 2560, True, False, False, False), "dense": (2560, 2560, False, True, False, True),
                 "mlp_in": (10240, 2560, True, False, True, False), "mlp_out": (2560, 10240, False, False, False, True),
                 "lm_head": (32000, 2560, True, False, False, False)}


@pytest.mark.skipif(not FULL_SHAPES, reason="the 2.7B widths need a GPU (hours under the interpreter)")
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("layer", MODEL_LINEARS)
def test_gemv_at_the_model_shapes(layer, M):
    """The decode step's GEMVs with the engine's configs: with aligned guard bands these are the exact variants the
    engine compiles (16-byte loads), so a GPU meets them here before `hayabusa verify` does."""
    N, K, has_ln, has_bias, gelu, has_residual = MODEL_LINEARS[layer]
    t = make_inputs(M, N, K, torch.float16, seed=3)
    epilogue = dict(bias=t["bias"] if has_bias else None, residual=t["residual"] if has_residual else None,
                    activation="gelu" if gelu else None)
    out = guarded_out(M, N, torch.float16)
    if has_ln:
        ln = (t["ln_weight"], t["ln_bias"], EPS)
        ln_linear(t["x"], *ln, t["weight"], **epilogue, out=out.tensor)
        expected = ln_linear_ref(t["x"], *ln, t["weight"], **epilogue)
    else:
        linear(t["x"], t["weight"], **epilogue, out=out.tensor)
        expected = linear_ref(t["x"], t["weight"], **epilogue)
    assert choose_linear(M, N, K, torch.float16, torch.device(DEVICE)).gemv is not None
    assert_close(out.tensor, expected, torch.float16)
    out.check()


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
