"""Comparison helper shared by kernel and engine tests: relative error per dtype, NaN never passes."""

import torch

# Relative error bound: max |actual - expected| / max |expected|, per dtype of the computation.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rel_tol: float | None = None, name: str = "output") -> None:
    """Fail with where and by how much `actual` differs from `expected` (both compared in float64)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    tol = rel_tol if rel_tol is not None else REL_TOL[dtype or expected.dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert not torch.isnan(e).any(), f"{name}: the expected tensor holds NaN (bad test input)"
    nan = torch.isnan(a) | torch.isinf(a)
    if nan.any():
        where = nan.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(nan.sum())} NaN/inf elements in the result, first at {where}")
    scale = e.abs().max().clamp_min(1e-30)
    diff = (a - e).abs()
    rel = (diff.max() / scale).item()
    if rel > tol:
        where = divmod_index(int(diff.argmax()), a.shape)
        raise AssertionError(
            f"{name}: relative error {rel:.3e} > {tol:.1e} (max |diff| {diff.max().item():.3e} at {where}: "
            f"got {a[where].item():.6g}, expected {e[where].item():.6g}; max |expected| {scale.item():.3e})"
        )


def divmod_index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rem = divmod(flat, size)
        index.append(rem)
    return tuple(reversed(index))


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgot to write cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
