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


GUARD_ELEMENTS = 257  # odd, so a band never lines up with a power-of-two tile (and the tensor starts misaligned)
ALIGNMENT = 16  # bytes: Triton compiles a kernel variant per pointer argument's 16-byte divisibility
# Whether Guarded tensors start 16-byte aligned (the variants the engine runs, its tensors being aligned) or not
# (scalar-load variants); tests/kernels/conftest.py sets it per test.
aligned_guards = False


def guard_elements(dtype: torch.dtype, aligned: bool) -> int:
    """Elements of each guard band: GUARD_ELEMENTS, or the fewest above 256 that keep a 16-byte start (264 fp16,
    260 fp32: neither a power of two)."""
    return 256 + ALIGNMENT // dtype.itemsize if aligned else GUARD_ELEMENTS

# Band bit patterns (before, after) per dtype: quiet NaNs with payloads no arithmetic produces, so a stray store of
# any value (a computed NaN included) changes a band's bits, and a stray read turns what it feeds into NaN.
_BAND_BITS = {
    torch.float32: (0x7FC5A5A5, 0xFFCA5A5A - 2**32),
    torch.float16: (0x7E5A, 0xFEA5 - 2**16),
    torch.bfloat16: (0x7FE5, 0xFFDA - 2**16),
    torch.float64: (0x7FF8A5A5A5A5A5A5, 0xFFF85A5A5A5A5A5A - 2**64),
}


class Guarded:
    """A contiguous tensor view inside a larger buffer whose bands before and after it are poisoned.

    A kernel that writes past either end of its output (or a cache) changes a band; `check` catches it bit for
    bit, where a plain allocation would let the stray store corrupt memory quietly. Float bands hold NaN, so a
    kernel that reads past an input's end computes NaN, which `assert_close` rejects. `guard`: the band's elements
    (default: guard_elements(dtype, aligned_guards)).
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device,
                 fill: float = float("nan"), guard: int | None = None) -> None:
        guard = guard_elements(dtype, aligned_guards) if guard is None else guard
        numel = 1
        for size in shape:
            numel *= size
        if not dtype.is_floating_point and fill != fill:  # integer tensors (quantized weights' codes): NaN has no bits
            fill = 0
        # torch.full, not torch.empty: GuardRegistry.patch_allocations routes torch.empty through this class
        self._buffer = torch.full((guard + numel + guard,), fill, dtype=dtype, device=device)
        bits = self._buffer.view(_same_size_int(dtype))
        before, after = _BAND_BITS.get(dtype, (0x5A, 0x25))  # integer dtypes: any fixed pattern
        bits[:guard] = before
        bits[guard + numel:] = after
        self.tensor = self._buffer[guard:guard + numel].view(shape)
        self._guard = guard
        self._bands = self._band_bits()

    @classmethod
    def copy_of(cls, tensor: torch.Tensor, guard: int | None = None) -> "Guarded":
        """A guarded copy of `tensor` (bit for bit, NaN payloads included)."""
        guarded = cls(tuple(tensor.shape), tensor.dtype, tensor.device, guard=guard)
        guarded.tensor.copy_(tensor)
        return guarded

    def _band_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self._buffer.view(_same_size_int(self._buffer.dtype)).clone()
        return bits[:self._guard], bits[-self._guard:]

    def check(self, name: str = "output") -> None:
        for side, before, after in zip(("before", "after"), self._bands, self._band_bits(), strict=True):
            changed = (before != after).nonzero()
            if changed.numel():
                raise AssertionError(f"{name}: {changed.numel()} elements of the guard band {side} the tensor were "
                                     f"written (out-of-bounds store), first at band offset {changed[0].item()}")


class GuardRegistry:
    """Every guarded tensor of one test, checked together: outputs and caches the test makes (`new`, `copy_of`)
    and, while `patch_allocations` is active, every floating-point tensor torch.empty / empty_like hand out (the
    outputs and workspaces kernels allocate themselves), NaN-filled so that an element never written cannot pass."""

    def __init__(self) -> None:
        self._guarded: list[tuple[str, Guarded]] = []

    def new(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device,
            name: str = "output") -> torch.Tensor:
        return self._add(name, Guarded(shape, dtype, device))

    def copy_of(self, tensor: torch.Tensor, name: str = "input") -> torch.Tensor:
        return self._add(name, Guarded.copy_of(tensor))

    def _add(self, name: str, guarded: Guarded) -> torch.Tensor:
        self._guarded.append((f"{name} #{len(self._guarded)} {tuple(guarded.tensor.shape)}", guarded))
        return guarded.tensor

    def check(self) -> None:
        for name, guarded in self._guarded:
            guarded.check(name)

    def patch_allocations(self, monkeypatch) -> None:
        empty, empty_like = torch.empty, torch.empty_like

        def guarded(tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.is_floating_point() or not tensor.is_contiguous():
                return tensor
            return self._add("torch.empty allocation", Guarded(tuple(tensor.shape), tensor.dtype, tensor.device))

        monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: guarded(empty(*args, **kwargs)))
        monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: guarded(empty_like(*args, **kwargs)))


def _same_size_int(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
