"""Epilogue-fused GEMM: Triton kernel vs its torch reference over odd shapes, every epilogue, every config path."""

import pytest
import torch
import triton

from hayabusa.kernels._launch import DeviceLimits, simulated_device
from hayabusa.kernels.linear import GemmConfig, choose_linear, launch_linear, linear, linear_ref

from devices import DEVICE, FULL_SHAPES, ON_GPU
from tolerance import GuardRegistry, assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): primes and non-powers of two, and 1-wide edges (every tile ragged) on CPU; the model's projections at
# decode and prefill sizes on a GPU.
SHAPES = [(1, 97, 80), (3, 160, 97), (17, 80, 160), (1, 1, 1), (2, 3, 5), (19, 1, 33)]
if FULL_SHAPES:
    SHAPES += [(m, n, k) for m in (1, 32, 2048) for n, k in ((7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240))]
# (bias, activation, residual): every epilogue combination
EPILOGUES = [(False, None, False), (True, None, False), (False, "gelu", False), (False, None, True),
             (True, None, True), (True, "gelu", True)]


def make_inputs(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # scaled so that activations stay O(1) whatever K is, as in the model
    return dict(x=torch.randn(M, K, generator=gen).to(DEVICE, dtype),
                weight=(torch.randn(N, K, generator=gen) / K**0.5).to(DEVICE, dtype),
                bias=torch.randn(N, generator=gen).to(DEVICE, dtype),
                residual=torch.randn(M, N, generator=gen).to(DEVICE, dtype))


def check_linear(run, M: int, N: int, K: int, dtype: torch.dtype, has_bias: bool, activation: str | None,
                 has_residual: bool, guards: GuardRegistry) -> None:
    """Kernel vs reference with every operand, the output and the split-K workspace inside guard bands."""
    inputs = {name: guards.copy_of(tensor, name) for name, tensor in make_inputs(M, N, K, dtype).items()}
    bias = inputs["bias"] if has_bias else None
    residual = inputs["residual"] if has_residual else None
    out = guards.new((M, N), dtype, DEVICE, "out")
    expected = linear_ref(inputs["x"], inputs["weight"], bias=bias, residual=residual, activation=activation)
    result = run(inputs["x"], inputs["weight"], bias, residual, activation, out)
    guards.check()
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_matches_reference(M, N, K, dtype, guards):
    def run(x, weight, bias, residual, activation, out):
        return linear(x, weight, bias=bias, residual=residual, activation=activation, out=out)

    check_linear(run, M, N, K, dtype, True, "gelu", True, guards)
    check_linear(run, M, N, K, dtype, False, None, False, guards)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_linear_epilogues(has_bias, activation, has_residual, dtype, guards):
    def run(x, weight, bias, residual, activation, out):
        return linear(x, weight, bias=bias, residual=residual, activation=activation, out=out)

    check_linear(run, 5, 48, 37, dtype, has_bias, activation, has_residual, guards)


# Forced configs reach every path whatever the table picks for small shapes: split-K with a ragged last K-tile and
# more splits than K-tiles need (4 K-tiles in 3 splits leaves the last split empty), split-K over even K-tiles,
# grouped M-tile order with ragged M, N and K, and split-K over a one-row, one-column output (every tile an edge).
CONFIG_CASES = [
    (GemmConfig(block_m=16, block_n=32, block_k=32, split_k=3, group_m=1, num_warps=4, num_stages=2), (3, 40, 97)),
    (GemmConfig(block_m=16, block_n=16, block_k=16, split_k=4, group_m=1, num_warps=4, num_stages=2), (3, 40, 128)),
    (GemmConfig(block_m=16, block_n=16, block_k=32, split_k=1, group_m=2, num_warps=4, num_stages=2), (37, 50, 97)),
    (GemmConfig(block_m=16, block_n=16, block_k=16, split_k=2, group_m=1, num_warps=4, num_stages=2), (1, 1, 33)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", CONFIG_CASES,
                         ids=["split3_ragged_k", "split4_even_k", "grouped_m", "split2_one_element"])
def test_linear_config_paths(config, shape, dtype, guards):
    def run(x, weight, bias, residual, activation, out):
        return launch_linear(config, x, weight, bias, residual, activation, out)

    check_linear(run, *shape, dtype, True, "gelu", True, guards)


def test_split_k_is_deterministic(guards):
    inputs = make_inputs(3, 40, 97, torch.float32)
    config = GemmConfig(block_m=16, block_n=32, block_k=16, split_k=4, group_m=1, num_warps=4, num_stages=2)
    first, second = (launch_linear(config, inputs["x"], inputs["weight"], None, None, None,
                                   guards.new((3, 40), torch.float32, DEVICE)) for _ in range(2))
    guards.check()
    assert torch.equal(first, second)


def test_linear_residual_in_place_and_empty_batch(guards):
    inputs = make_inputs(3, 40, 97, torch.float16)
    expected = linear_ref(inputs["x"], inputs["weight"], residual=inputs["residual"])
    stream = guards.copy_of(inputs["residual"], "residual stream")
    result = linear(inputs["x"], inputs["weight"], residual=stream, out=stream)
    guards.check()
    assert result.data_ptr() == stream.data_ptr()
    assert_close(stream, expected)
    empty = linear(inputs["x"][:0], inputs["weight"])
    assert empty.shape == (0, 40)


def test_tile_config_regimes():
    def tile_config(M: int, N: int, K: int, dtype: torch.dtype = torch.float16, smem_bytes: int = 232448):
        with simulated_device(DeviceLimits(num_sms=132, shared_memory_bytes=smem_bytes)):  # an H100's SMs
            choice = choose_linear(M, N, K, dtype, torch.device("meta"))
        assert choice.gemv is None  # rows past GEMV_MAX_M: the tile GEMM
        return choice.gemm

    decode = tile_config(16, 2560, 10240)  # dense_4h_to_h: 40 output tiles of 64 columns
    assert decode.block_m == 16 and decode.split_k == 4  # K split until every SM streams weights
    assert triton.cdiv(10240, decode.block_k) // decode.split_k >= 4
    assert tile_config(16, 10240, 2560).split_k == 1  # 160 output tiles already cover 132 SMs
    prefill = tile_config(2048, 10240, 2560)
    assert prefill.block_m == 128 and prefill.split_k == 1
    small_smem = tile_config(2048, 10240, 2560, smem_bytes=101376)
    assert small_smem.num_stages * (small_smem.block_m + small_smem.block_n) * small_smem.block_k * 2 <= 101376
    assert tile_config(16, 97, 80, torch.float32).block_k == 64  # fits tiny K


def test_linear_rejects_bad_arguments(monkeypatch):
    inputs = make_inputs(3, 40, 97, torch.float16)
    x, weight = inputs["x"], inputs["weight"]
    cases = [
        (dict(x=x.float()), "weight has dtype torch.float16, expected torch.float32"),
        (dict(weight=weight[:, :96].contiguous()), r"weight has shape \(40, 96\), expected \[N, 97\]"),
        (dict(x=x.t().contiguous().t()), "x must be contiguous"),
        (dict(x=x[0]), "x must have 2 dims"),
        (dict(bias=inputs["bias"][:39]), r"bias has shape \(39,\), expected \(40,\)"),
        (dict(residual=inputs["residual"].float()), "residual has dtype torch.float32, expected torch.float16"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(out=poisoned((3, 41), torch.float16, DEVICE)), r"out has shape \(3, 41\), expected \(3, 40\)"),
        (dict(x=x.to(torch.int32), weight=weight.to(torch.int32)), "x has dtype torch.int32"),
        (dict(weight=weight.to("meta")), "weight is on meta"),
    ]
    for overrides, message in cases:
        args = dict(x=x, weight=weight) | overrides
        for fn in (linear, linear_ref):
            with pytest.raises(ValueError, match=message):
                fn(**args)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            linear(x, weight)
