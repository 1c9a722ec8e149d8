"""The MLP block the paged model runs (LayerNorm and GELU around the first GEMM, the residual in the second's
epilogue) vs its torch reference."""

import pytest
import torch

from hayabusa.kernels.mlp import fused_mlp, fused_mlp_ref

from devices import DEVICE, FULL_SHAPES
from tolerance import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# (M, hidden, intermediate): odd sizes on CPU, rows on both sides of the GEMV (M <= 4) and tile paths; the 2.7B
# model's 2560 -> 10240 -> 2560 at decode and prefill on a GPU.
SHAPES = [(1, 80, 320), (3, 97, 160), (17, 80, 97), (2, 1, 4)]
if FULL_SHAPES:
    SHAPES += [(1, 2560, 10240), (32, 2560, 10240), (2048, 2560, 10240)]


def make_inputs(M: int, hidden: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(M * 7919 + hidden)
    x = torch.randn(M, hidden, generator=gen) * 2 + 1  # the residual stream
    ln_weight = 1 + 0.5 * torch.randn(hidden, generator=gen)
    ln_bias = torch.randn(hidden, generator=gen)
    w_in = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    w_out = torch.randn(hidden, inter, generator=gen) / inter**0.5
    return tuple(t.to(DEVICE, dtype) for t in (x, ln_weight, ln_bias, w_in, w_out))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,hidden,inter", SHAPES)
def test_fused_mlp_matches_reference(M, hidden, inter, dtype, guards):
    x, ln_weight, ln_bias, w_in, w_out = (guards.copy_of(t, "input") for t in make_inputs(M, hidden, inter, dtype))
    expected = fused_mlp_ref(x, ln_weight, ln_bias, EPS, w_in, w_out)
    out = guards.new((M, hidden), dtype, DEVICE, "out")
    assert fused_mlp(x, ln_weight, ln_bias, EPS, w_in, w_out, out=out).data_ptr() == out.data_ptr()
    guards.check()  # the GELU intermediate comes from torch.empty, guarded too
    assert_close(out, expected, dtype)
    # The reference itself is the model's MLP block: x + dense_4h_to_h(gelu(dense_h_to_4h(ln(x)))).
    normed = torch.nn.functional.layer_norm(x.double(), (hidden,), ln_weight.double(), ln_bias.double(), EPS)
    gelu_of = torch.nn.functional.gelu((normed.to(dtype).double() @ w_in.double().T).to(dtype).double())
    assert_close(expected, x.double() + gelu_of.to(dtype).double() @ w_out.double().T, dtype, name="reference")


def test_fused_mlp_updates_the_residual_stream_in_place(guards):
    x, ln_weight, ln_bias, w_in, w_out = make_inputs(3, 97, 160, torch.float16)
    expected = fused_mlp_ref(x, ln_weight, ln_bias, EPS, w_in, w_out)
    stream = guards.copy_of(x, "residual stream")
    fused_mlp(stream, ln_weight, ln_bias, EPS, w_in, w_out, out=stream)
    guards.check()
    assert_close(stream, expected)


def test_fused_mlp_rejects_bad_arguments():
    x, ln_weight, ln_bias, w_in, w_out = make_inputs(3, 97, 160, torch.float16)
    cases = [
        (dict(w_in=w_in[:, :96].contiguous()), r"w_in has shape \(160, 96\), expected \[intermediate, 97\]"),
        (dict(w_out=w_out.T.contiguous()), r"w_out has shape \(160, 97\), expected \(97, 160\)"),
        (dict(w_out=w_out.float()), "w_out has dtype torch.float32, expected torch.float16"),
        (dict(ln_weight=ln_weight[:96]), r"ln_weight has shape \(96,\), expected \(97,\)"),
        (dict(eps=0.0), "eps must be a positive float"),
        (dict(out=x[:2]), r"out has shape \(2, 97\), expected \(3, 97\)"),
        (dict(x=x.T), "x must be contiguous"),
    ]
    for overrides, message in cases:
        args = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, eps=EPS, w_in=w_in, w_out=w_out) | overrides
        for fn in (fused_mlp, fused_mlp_ref):
            with pytest.raises(ValueError, match=message):
                fn(**args)
