import pytest
import torch

from tolerance import assert_close


def test_assert_close_rejects_nan_and_large_errors():
    expected = torch.randn(4, 5)
    assert_close(expected.clone(), expected)
    broken = expected.clone()
    broken[2, 3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(broken, expected)
    off = expected.clone()
    off[1, 1] += 1.0
    with pytest.raises(AssertionError, match=r"at \(1, 1\)"):
        assert_close(off, expected)
    assert_close(expected.half(), expected, dtype=torch.float16)
