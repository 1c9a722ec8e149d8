"""LayerNorm: Triton kernel vs its torch reference, whole-row and chunked rows."""

import pytest
import torch

from hayabusa.kernels.layernorm import layer_norm, layer_norm_ref

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
    """x, weight, bias, each inside guard bands (a read past an end turns the output NaN)."""
    gen = torch.Generator().manual_seed(M * 7919 + N)
    # an offset mean and a large spread, so one-pass variance or low-precision statistics would show
    x = torch.randn(M, N, generator=gen) * 4 + 3
    weight = 1 + 0.5 * torch.randn(N, generator=gen)
    bias = torch.randn(N, generator=gen)
    return tuple(guards.copy_of(t.to(DEVICE, dtype), name)
                 for t, name in ((x, "x"), (weight, "weight"), (bias, "bias")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", SHAPES)
def test_layer_norm_matches_reference(M, N, dtype, guards):
    x, weight, bias = make_inputs(M, N, dtype, guards)
    expected = layer_norm_ref(x, weight, bias, EPS)
    out = guards.new((M, N), dtype, DEVICE, "out")
    assert layer_norm(x, weight, bias, EPS, out=out).data_ptr() == out.data_ptr()
    guards.check()
    assert_close(out, expected, dtype)
    torch_ln = torch.nn.functional.layer_norm(x.double(), (N,), weight.double(), bias.double(), EPS)
    assert_close(expected, torch_ln, dtype, name="reference")


def test_layer_norm_rejects_bad_arguments(guards):
    x, weight, bias = make_inputs(3, 97, torch.float16, guards)
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
