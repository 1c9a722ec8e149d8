"""A memcheck for Triton's CPU interpreter: every element a kernel loads or stores (mask on) must lie inside one of
the tensors passed to that launch.

compute-sanitizer does this on a GPU. Under the interpreter a stray store lands in whatever memory sits next to the
tensor (or aborts the process much later), and a stray read that feeds no output goes unseen by any value check.
Here each launch records the byte ranges of its tensor arguments, and each load and store checks its addresses
against them, failing the launch at the first access outside with the offset from the nearest tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton.runtime import interpreter


class OutOfBoundsAccess(AssertionError):
    pass


Region = tuple[str, int, int]  # (argument name, first byte, one past the last byte)


def tensor_region(name: str, tensor: torch.Tensor) -> Region:
    """The bytes a tensor view covers (strided views included): data_ptr up to its last element's end."""
    if tensor.numel() == 0:
        return name, tensor.data_ptr(), tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return name, tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


class InterpreterMemcheck:
    def __init__(self) -> None:
        self._launches: list[tuple[str, list[Region]]] = []  # a stack: the kernel running now is last
        self.num_launches = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run_grid = interpreter.GridExecutor.__call__
        load = interpreter.InterpreterBuilder.create_masked_load
        store = interpreter.InterpreterBuilder.create_masked_store
        memcheck = self

        def checked_grid(executor, *args, **kwargs):
            named = [*zip(executor.arg_names, args, strict=False), *kwargs.items()]
            regions = [tensor_region(name, arg) for name, arg in named if isinstance(arg, torch.Tensor)]
            memcheck._launches.append((executor.fn.__name__, regions))
            memcheck.num_launches += 1
            try:
                return run_grid(executor, *args, **kwargs)
            finally:
                memcheck._launches.pop()

        def checked_load(builder, ptrs, mask, other, cache_policy, is_volatile):
            memcheck._check("load", ptrs, mask)
            return load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def checked_store(builder, ptrs, value, mask, cache_policy):
            memcheck._check("store", ptrs, mask)
            return store(builder, ptrs, value, mask, cache_policy)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked_grid)
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", checked_load)
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", checked_store)

    def _check(self, kind: str, ptrs, mask) -> None:
        if not self._launches:
            return
        kernel, regions = self._launches[-1]
        itemsize = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for _, start, end in regions:
            inside |= (addresses >= start) & (addresses + itemsize <= end)
        if inside.all():
            return
        address = int(addresses[~inside][0])
        name, start, end = min(regions, key=lambda r: min(abs(address - r[1]), abs(address - r[2])))
        where = (f"{(start - address) // itemsize} elements before '{name}'" if address < start
                 else f"{(address - end) // itemsize} elements past the end of '{name}'")
        raise OutOfBoundsAccess(f"{kernel}: out-of-bounds {kind} of {int((~inside).sum())} elements, the first "
                                f"{where} (element size {itemsize} bytes)")
