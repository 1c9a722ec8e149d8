"""LayerNorm and residual-add + LayerNorm: Triton kernel vs its torch reference, whole-row and chunked rows."""

import pytest
import torch

from hayabusa.kernels.layernorm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref

from devices import DEVICE, FULL_SHAPES
from tolerance import GuardRegistry, assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# (M, N): one-element and odd widths, the model's hidden 2560, and 16411 > 16384, which walks the row in chunks
# (the last chunk ragged).
SHAPES = [(1, 80), (3, 97), (17, 160), (3, 2560), (2, 16411), (2, 1), (5, 3)]
if FULL_SHAPES:
    SHAPES += [(1, 2560), (32, 2560), (2048, 2560)]


def make_inputs(M: int, N: int, dtype: torch.dtype, guards: GuardRegistry) -> tuple[torch.Tensor, ...]:
    """x, residual, weight, bias, each inside guard bands (a read past an end turns the output NaN)."""
    gen = torch.Generator().manual_seed(M * 7919 + N)
    # an offset mean and a large spread, so one-pass variance or low-precision statistics would show
    x = torch.randn(M, N, generator=gen) * 4 + 3
    residual = torch.randn(M, N, generator=gen)
    weight = 1 + 0.5 * torch.randn(N, generator=gen)
    bias = torch.randn(N, generator=gen)
    return tuple(guards.copy_of(t.to(DEVICE, dtype), name)
                 for t, name in ((x, "x"), (residual, "residual"), (weight, "weight"), (bias, "bias")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", SHAPES)
def test_layer_norm_matches_reference(M, N, dtype, guards):
    x, _, weight, bias = make_inputs(M, N, dtype, guards)
    expected = layer_norm_ref(x, weight, bias, EPS)
    out = guards.new((M, N), dtype, DEVICE, "out")
    assert layer_norm(x, weight, bias, EPS, out=out).data_ptr() == out.data_ptr()
    guards.check()
    assert_close(out, expected, dtype)
    torch_ln = torch.nn.functional.layer_norm(x.double(), (N,), weight.double(), bias.double(), EPS)
    assert_close(expected, torch_ln, dtype, name="reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", SHAPES)
def test_add_layer_norm_matches_reference(M, N, dtype, guards):
    x, residual, weight, bias = make_inputs(M, N, dtype, guards)
    expected_y, expected_summed = add_layer_norm_ref(x, residual, weight, bias, EPS)
    out, summed_out = guards.new((M, N), dtype, DEVICE, "out"), guards.new((M, N), dtype, DEVICE, "summed_out")
    y, summed = add_layer_norm(x, residual, weight, bias, EPS, out=out, summed_out=summed_out)
    guards.check()
    assert y.data_ptr() == out.data_ptr() and summed.data_ptr() == summed_out.data_ptr()
    assert_close(summed, expected_summed, dtype, name="summed")
    assert_close(y, expected_y, dtype, name="y")
    assert torch.equal(expected_summed, (x.float() + residual.float()).to(dtype))


@pytest.mark.parametrize("N", [97, 16411])
def test_add_layer_norm_updates_residual_in_place(N, guards):
    x, residual, weight, bias = make_inputs(2, N, torch.float16, guards)
    expected_y, expected_summed = add_layer_norm_ref(x, residual, weight, bias, EPS)
    stream = guards.copy_of(residual, "residual stream")
    y, summed = add_layer_norm(x, stream, weight, bias, EPS, summed_out=stream)
    guards.check()
    assert summed.data_ptr() == stream.data_ptr()
    assert_close(stream, expected_summed)
    assert_close(y, expected_y)


def test_layer_norm_rejects_bad_arguments(guards):
    x, residual, weight, bias = make_inputs(3, 97, torch.float16, guards)
    cases = [
        (dict(weight=weight[:96]), r"weight has shape \(96,\), expected \(97,\)"),
        (dict(bias=bias.float()), "bias has dtype torch.float32, expected torch.float16"),
        (dict(x=x.T), r"x must be contiguous"),
        (dict(x=x[0]), "x must have 2 dims"),
        (dict(eps=0.0), "eps must be a positive float"),
        (dict(out=poisoned((3, 97), torch.float32, DEVICE)), "out has dtype torch.float32"),
    ]
    for overrides, message in cases:
        args = dict(x=x, weight=weight, bias=bias, eps=EPS) | overrides
        for fn in (layer_norm, layer_norm_ref):
            with pytest.raises(ValueError, match=message):
                fn(**args)
    for fn in (add_layer_norm, add_layer_norm_ref):
        with pytest.raises(ValueError, match=r"residual has shape \(3, 96\), expected \(3, 97\)"):
            fn(x, residual[:, :96].contiguous(), weight, bias, EPS)
        with pytest.raises(ValueError, match="summed_out has dtype torch.bfloat16"):
            fn(x, residual, weight, bias, EPS, summed_out=residual.bfloat16())
