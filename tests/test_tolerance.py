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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8])
def test_aligned_bands_keep_a_16_byte_start_and_odd_ones_do_not(dtype, monkeypatch):
    import tolerance

    monkeypatch.setattr(tolerance, "aligned_guards", True)
    aligned = Guarded((5, 3), dtype, "cpu", fill=0)
    assert aligned.tensor.data_ptr() % 16 == 0 and aligned._guard not in (256, 512) and aligned._guard > 256
    monkeypatch.setattr(tolerance, "aligned_guards", False)
    odd = Guarded((5, 3), dtype, "cpu", fill=0)
    assert odd.tensor.data_ptr() % 16 != 0 and odd._guard == 257


def test_kernel_tests_run_every_aligned_variant_before_any_odd_one():
    """tests/kernels/conftest.py's collection hook: a stable sort, every aligned test first (on a GPU both run)."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("kernel_tests_conftest",
                                                  Path(__file__).parent / "kernels" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    collected = [("a.py::x", "aligned"), ("a.py::x", "odd"), ("a.py::y", "aligned"), ("a.py::y", "odd"),
                 ("b.py::z", "odd"), ("b.py::z", "aligned"), ("c.py::plain", None)]
    items = [SimpleNamespace(name=name, callspec=SimpleNamespace(params={} if guards is None else {"guards": guards}))
             for name, guards in collected]
    conftest.pytest_collection_modifyitems(items)
    assert [(item.name, item.callspec.params.get("guards")) for item in items] == [
        ("a.py::x", "aligned"), ("a.py::y", "aligned"), ("b.py::z", "aligned"), ("c.py::plain", None),
        ("a.py::x", "odd"), ("a.py::y", "odd"), ("b.py::z", "odd")]
