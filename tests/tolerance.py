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


GUARD_ELEMENTS = 257  # odd, so a band never lines up with a power-of-two tile


class Guarded:
    """A contiguous tensor view inside a larger buffer whose bands before and after it are poisoned.

    A kernel that writes past either end of its output (or a cache) changes a band; `check` catches it bit for
    bit, where a plain allocation would let the stray store corrupt memory quietly.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device,
                 fill: float = float("nan"), guard: int = GUARD_ELEMENTS) -> None:
        numel = 1
        for size in shape:
            numel *= size
        self._buffer = torch.empty(guard + numel + guard, dtype=dtype, device=device)
        self._buffer[:guard] = _band_value(dtype, 0)
        self._buffer[guard + numel:] = _band_value(dtype, 1)
        self.tensor = self._buffer[guard:guard + numel].view(shape)
        self.tensor.fill_(fill)
        self._guard = guard
        self._bands = self._band_bits()

    def _band_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self._buffer.view(_same_size_int(self._buffer.dtype)).clone()
        return bits[:self._guard], bits[-self._guard:]

    def check(self, name: str = "output") -> None:
        for side, before, after in zip(("before", "after"), self._bands, self._band_bits(), strict=True):
            changed = (before != after).nonzero()
            if changed.numel():
                raise AssertionError(f"{name}: {changed.numel()} elements of the guard band {side} the tensor were "
                                     f"written (out-of-bounds store), first at band offset {changed[0].item()}")


def _same_size_int(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _band_value(dtype: torch.dtype, side: int) -> float | int:
    """Poison that no kernel writes by accident: NaN-like for floats, a large sentinel for integers."""
    if dtype.is_floating_point:
        return float("nan") if side == 0 else -12345.0
    return -7777 if side == 0 else 7777
