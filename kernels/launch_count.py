"""Record device kernel launches instead of running them: every Triton launch (kernel, grid, arguments) and every
torch operator that would launch a device kernel.

With meta tensors and `simulated_device(H200)` this counts (and lists the compile-time specializations of) what a
forward pass launches on a GPU, on a machine without one: nothing executes, launchers only pick their configs.

    with simulated_device(H200), recorded_launches() as log:
        model.decode(inputs, kv_caches)  # meta tensors
    len(log.triton), log.torch_ops
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

# torch operators that only allocate or describe memory: no device kernel (views are recognised by their schema)
NO_KERNEL_OPS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                 torch.ops.aten.empty_like.default, torch.ops.aten.lift_fresh.default}


@dataclass
class RecordedLaunch:
    kernel: KernelInterface  # the @triton.jit function (a JITFunction, or an InterpretedFunction under the interpreter)
    grid: tuple[int, ...]
    args: tuple  # positional arguments: the runtime ones
    kwargs: dict  # the constexprs and launch options, as the launchers pass them

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        """With the kernel, what selects the compiled variant (beyond argument alignment): constexprs, num_warps and
        num_stages, as (name, value) sorted by name."""
        return tuple(sorted((k, str(v)) for k, v in self.kwargs.items()))


@dataclass
class LaunchLog:
    triton: list[RecordedLaunch] = field(default_factory=list)
    torch_ops: list[str] = field(default_factory=list)  # e.g. "aten.embedding.default", one per device kernel


class _DeviceKernelOps(TorchDispatchMode):
    """Notes every torch operator that launches a device kernel (not views, not bare allocations), then runs it."""

    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in NO_KERNEL_OPS:
            self.into.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded_launches() -> Iterator[LaunchLog]:
    """While active, `kernel[grid](...)` appends to the log instead of launching, and torch ops are logged."""
    log = LaunchLog()

    def record(kernel: KernelInterface, *args, grid, warmup, **kwargs) -> None:
        log.triton.append(RecordedLaunch(kernel, tuple(grid), args, kwargs))

    runs = JITFunction.run, InterpretedFunction.run
    JITFunction.run = InterpretedFunction.run = record
    try:
        with _DeviceKernelOps(log.torch_ops):
            yield log
    finally:
        JITFunction.run, InterpretedFunction.run = runs
