"""Fused MLP (GELU in the first GEMM's epilogue, residual in the second's) vs its torch reference."""

import pytest
import torch

from hayabusa.kernels.mlp import fused_mlp, fused_mlp_ref

from devices import DEVICE, FULL_SHAPES
from tolerance import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, hidden, intermediate): odd sizes on CPU; the 2.7B model's 2560 -> 10240 -> 2560 at decode and prefill on a GPU.
SHAPES = [(1, 80, 320), (3, 97, 160), (17, 80, 97), (2, 1, 4)]
if FULL_SHAPES:
    SHAPES += [(1, 2560, 10240), (32, 2560, 10240), (2048, 2560, 10240)]


def make_inputs(M: int, hidden: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(M * 7919 + hidden)
    x = torch.randn(M, hidden, generator=gen)
    w_in = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    w_out = torch.randn(hidden, inter, generator=gen) / inter**0.5
    residual = torch.randn(M, hidden, generator=gen)
    return tuple(t.to(DEVICE, dtype) for t in (x, w_in, w_out, residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,hidden,inter", SHAPES)
def test_fused_mlp_matches_reference(M, hidden, inter, dtype, guards):
    x, w_in, w_out, residual = (guards.copy_of(t, "input") for t in make_inputs(M, hidden, inter, dtype))
    expected = fused_mlp_ref(x, w_in, w_out, residual)
    out = guards.new((M, hidden), dtype, DEVICE, "out")
    assert fused_mlp(x, w_in, w_out, residual, out=out).data_ptr() == out.data_ptr()
    guards.check()  # the GELU intermediate comes from torch.empty, guarded too
    assert_close(out, expected, dtype)
    # The reference itself is the model's MLP: residual + dense_4h_to_h(gelu(dense_h_to_4h(x))).
    gelu_of = torch.nn.functional.gelu((x.double() @ w_in.double().T).to(dtype).double())
    assert_close(expected, residual.double() + gelu_of.to(dtype).double() @ w_out.double().T, dtype, name="reference")


def test_fused_mlp_in_place_residual(guards):
    x, w_in, w_out, residual = make_inputs(3, 97, 160, torch.float16)
    expected = fused_mlp_ref(x, w_in, w_out, residual)
    stream = guards.copy_of(residual, "residual stream")
    fused_mlp(x, w_in, w_out, stream, out=stream)
    guards.check()
    assert_close(stream, expected)


def test_fused_mlp_rejects_bad_arguments():
    x, w_in, w_out, residual = make_inputs(3, 97, 160, torch.float16)
    cases = [
        (dict(w_in=w_in[:, :96].contiguous()), r"w_in has shape \(160, 96\), expected \[intermediate, 97\]"),
        (dict(w_out=w_out.T.contiguous()), r"w_out has shape \(160, 97\), expected \(97, 160\)"),
        (dict(w_out=w_out.float()), "w_out has dtype torch.float32, expected torch.float16"),
        (dict(residual=residual[:2]), r"residual has shape \(2, 97\), expected \(3, 97\)"),
        (dict(x=x.T), "x must be contiguous"),
    ]
    for overrides, message in cases:
        args = dict(x=x, w_in=w_in, w_out=w_out, residual=residual) | overrides
        for fn in (fused_mlp, fused_mlp_ref):
            with pytest.raises(ValueError, match=message):
                fn(**args)
