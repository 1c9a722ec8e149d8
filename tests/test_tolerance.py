import pytest
import torch

from tolerance import Guarded, GuardRegistry, assert_close


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_guarded_catches_a_store_past_either_end(dtype):
    for index, side in ((-1, "before"), (12, "after")):
        guarded = Guarded((3, 4), dtype, "cpu", fill=0)
        guarded.tensor.fill_(1)  # in bounds: fine
        guarded.check()
        flat = guarded._buffer
        flat[guarded._guard + index] = 7  # one element past the view's end (or before its start)
        with pytest.raises(AssertionError, match=f"guard band {side}"):
            guarded.check("out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_guarded_float_bands_are_nan_and_copy_keeps_bits(dtype):
    source = torch.tensor([1.0, float("nan"), -2.0], dtype=dtype)
    guarded = Guarded.copy_of(source)
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(guarded.tensor.view(int_dtype), source.view(int_dtype))
    assert guarded._buffer[: guarded._guard].isnan().all() and guarded._buffer[-guarded._guard:].isnan().all()
    past_end = guarded._buffer[guarded._guard + 3]  # what a read one element past the end sees
    assert (past_end * 0).isnan()  # it turns even a zero-weighted term into NaN
    # a stray store of a computed NaN differs from the band's NaN payload bit for bit
    guarded._buffer[guarded._guard + 3] = float("nan")
    with pytest.raises(AssertionError, match="guard band after"):
        guarded.check()


def test_registry_routes_torch_empty_through_guard_bands(monkeypatch):
    registry = GuardRegistry()
    registry.patch_allocations(monkeypatch)
    out = torch.empty(2, 3)
    assert out.isnan().all() and out.is_contiguous()
    assert torch.empty(4, dtype=torch.int64).dtype == torch.int64  # integer tensors are left alone
    registry.check()
    torch.as_strided(out, (1,), (1,), storage_offset=out.storage_offset() + 6).fill_(0.0)  # out[2, 0]
    with pytest.raises(AssertionError, match=r"torch.empty allocation #0 \(2, 3\).*guard band after"):
        registry.check()
