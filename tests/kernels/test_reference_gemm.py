"""linear_ref's CPU paths (oneDNN fused product, blocked half-precision upcast) against the textbook fp32 form."""

import pytest
import torch
import torch.nn.functional as F

from hayabusa.kernels import _reference_gemm
from hayabusa.kernels.linear import linear_ref

from tolerance import assert_close, poisoned

# (bias, activation, residual)
EPILOGUES = [(False, None, False), (True, None, False), (False, "gelu", False), (True, None, True),
             (True, "gelu", True)]


def textbook(x, weight, bias, residual, activation):
    """The kernel's math written out: fp32 product and epilogue, one rounding to x's dtype."""
    y = x.float() @ weight.float().T + (bias.float() if bias is not None else 0.0)
    y = F.gelu(y) if activation == "gelu" else y
    return (y + (residual.float() if residual is not None else 0.0)).to(x.dtype)


def inputs(m, n, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).to(dtype), (torch.randn(n, k, generator=gen) / k**0.5).to(dtype),
            torch.randn(n, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype))


@pytest.mark.parametrize(("has_bias", "activation", "has_residual"), EPILOGUES)
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_onednn_path_matches_the_textbook_form(monkeypatch, has_bias, activation, has_residual, rows):
    if not _reference_gemm.onednn_fuses(torch.float32):
        pytest.skip("this torch build has no oneDNN fused linear")
    monkeypatch.setattr(_reference_gemm, "ONEDNN_MIN_FP32_WEIGHT", 0)  # small weights take it too
    monkeypatch.setattr(_reference_gemm, "ONEDNN_MIN_FP32_K", 0)
    x, weight, bias, residual = inputs(rows, 67, 96, torch.float32)
    bias, residual = (bias if has_bias else None), (residual if has_residual else None)
    assert_close(linear_ref(x, weight, bias=bias, residual=residual, activation=activation),
                 textbook(x, weight, bias, residual, activation), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("has_bias", "activation", "has_residual"), EPILOGUES)
def test_half_precision_rounds_the_fp32_result_once(monkeypatch, dtype, has_bias, activation, has_residual):
    # 4 KiB blocks: the 67 weight rows of K = 96 are upcast 10 rows at a time, the last block short
    monkeypatch.setattr(_reference_gemm, "WEIGHT_BLOCK_BYTES", 4096)
    x, weight, bias, residual = inputs(5, 67, 96, dtype)
    bias, residual = (bias if has_bias else None), (residual if has_residual else None)
    out = poisoned((5, 67), dtype, "cpu")
    result = linear_ref(x, weight, bias=bias, residual=residual, activation=activation, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = textbook(x, weight, bias, residual, activation)
    # one rounding of the same fp32 value: equal up to the fp32 summation order, i.e. one unit in the last place
    ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((result.float() - expected.float()).abs() <= ulp).all()

