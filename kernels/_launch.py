"""Launch helpers shared by the kernel modules: input validation, device facts, host-side integer math, the
split reductions' ticket counters, programmatic dependent launch, row-kernel block sizes.

Host code on the launch path avoids `triton.cdiv` / `triton.next_power_of_2` (constexpr-aware wrappers that cost
microseconds per call in Triton 3.9) and caches every per-shape decision on plain-int keys.
"""

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PDL_OFF_VARIABLE = "HAYABUSA_DISABLE_PDL"  # "1": no programmatic dependent launch (to measure what it gains)


@dataclass(frozen=True)
class DeviceLimits:
    """What launch configs are fitted to: SMs to fill, the shared memory one block may use, and whether programs
    run one by one in Triton's CPU interpreter (where fewer, larger programs and no splitting are faster)."""

    num_sms: int
    shared_memory_bytes: int
    interpreted: bool = False
    programmatic_launch: bool = False  # programmatic dependent launch (sm_90+) with a Triton that exposes it


H200 = DeviceLimits(num_sms=132, shared_memory_bytes=232448,  # sm_90: 132 SMs, 227 KB opt-in per block (H100 too)
                    programmatic_launch=True)
INTERPRETER = DeviceLimits(num_sms=8, shared_memory_bytes=1 << 30, interpreted=True)
_simulated: DeviceLimits | None = None  # set by `simulated_device`


@contextlib.contextmanager
def simulated_device(limits: DeviceLimits) -> Iterator[None]:
    """Launchers pick the configs of a device with these limits (e.g. H200) whatever tensors they get, and
    check_triton_device accepts meta tensors: for recording launches (counts, compile checks) without the GPU."""
    global _simulated
    previous, _simulated = _simulated, limits
    try:
        yield
    finally:
        _simulated = previous


def device_limits(device: torch.device) -> DeviceLimits:
    """The simulated device's limits inside `simulated_device`, else `device`'s own (INTERPRETER off CUDA)."""
    return _simulated if _simulated is not None else _real_limits(device)


@functools.cache
def _real_limits(device: torch.device) -> DeviceLimits:
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return DeviceLimits(properties.multi_processor_count,
                        triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"],
                        programmatic_launch=properties.major >= 9 and os.environ.get(PDL_OFF_VARIABLE) != "1")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


SPLIT_MAX_ROWS = 256  # linear layers split K only up to this many rows (decode batches), in tiles of >= 16 x 16
MIN_SPLIT_TILE = 16
_engine_tickets: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("tickets", default=None)


def ticket_capacity(max_out_features: int, max_decode_rows: int, num_heads: int) -> int:
    """Ticket counters enough for every split launch of a model: a linear layer (GEMV, tile GEMM, quantized or not)
    takes one per output tile, at most cdiv(SPLIT_MAX_ROWS, 16) x cdiv(N, 16) (it splits only up to SPLIT_MAX_ROWS
    rows, in tiles of at least 16 x 16); decode attention one per (sequence, head)."""
    linear = cdiv(SPLIT_MAX_ROWS, MIN_SPLIT_TILE) * cdiv(max_out_features, MIN_SPLIT_TILE)
    return max(linear, max_decode_rows * num_heads)


@contextlib.contextmanager
def engine_tickets(counters: torch.Tensor) -> Iterator[None]:
    """Split launches inside the block use `counters` (int32 zeros, [ticket_capacity(...)]): an engine's own,
    allocated once before any CUDA-graph capture, so captured graphs keep pointing at live memory and two engines
    never share counters."""
    token = _engine_tickets.set(counters)
    try:
        yield
    finally:
        _engine_tickets.reset(token)


def ticket_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 [>= count] zeros, one per output tile of a split reduction.

    Each split of a tile takes a ticket (atomic add) after storing its partial; the last one reduces the partials
    in split order and sets the counter back to 0, so the buffer is all zeros again when the kernel ends and the
    next launch on the stream (or a CUDA-graph replay) reuses it. Inside `engine_tickets`: the engine's counters
    (never reallocated; a launch needing more than they hold is refused). Outside: fresh zeros for this launch
    (one fill kernel more), so a kernel called on its own shares no state with anything.
    """
    counters = _engine_tickets.get()
    if counters is None:
        return torch.zeros(count, dtype=torch.int32, device=device)
    if counters.numel() < count or counters.device != device:
        raise ValueError(f"a split launch needs {count} ticket counters on {device}; the engine's hold "
                         f"{counters.numel()} on {counters.device} (size them with ticket_capacity)")
    return counters


# Programmatic dependent launch (sm_90+): a kernel launched with launch_pdl may start while the kernel before it
# drains. It loads only what no kernel of the step writes (weights) before `wait_for_prior_grid`, which returns once
# the previous kernel has completed and its writes are visible; then it lets the next kernel launch. Every program
# waits before it ends, so each kernel completes after its predecessor and the chain stays ordered. Triton >= 3.4
# has it (tl.extra.cuda.gdc_*, the launch_pdl option); on an older Triton both helpers compile to nothing.
try:
    from triton.backends.nvidia.compiler import CUDAOptions
    CUDA_LAUNCH_OPTIONS = frozenset(CUDAOptions.__dataclass_fields__)
except ImportError:  # a Triton without its NVIDIA backend
    CUDA_LAUNCH_OPTIONS = frozenset()
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    TRITON_HAS_PDL = "launch_pdl" in CUDA_LAUNCH_OPTIONS
except ImportError:
    TRITON_HAS_PDL = False

if TRITON_HAS_PDL:
    @triton.jit
    def wait_for_prior_grid(PDL: tl.constexpr):
        """With PDL: wait until the previous kernel has completed, then let the next one launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    @triton.jit
    def wait_for_prior_grid(PDL: tl.constexpr):
        """This Triton has no programmatic dependent launch: launches are ordered as usual, nothing to wait for."""
        pass


def uses_pdl(device: torch.device) -> bool:
    """Whether launches on `device` (or the simulated one) use programmatic dependent launch."""
    limits = device_limits(device)
    return limits.programmatic_launch and TRITON_HAS_PDL and not limits.interpreted


def register_cap(registers: int) -> dict:
    """The launch option that caps a kernel's registers per thread (ptxas' .maxnreg), where this Triton has it."""
    return {"maxnreg": registers} if "maxnreg" in CUDA_LAUNCH_OPTIONS else {}


def pdl_meta(enabled: bool) -> dict:
    """The PDL constexpr of a kernel that calls wait_for_prior_grid, with the launch option that goes with it."""
    return dict(PDL=True, launch_pdl=True) if enabled else dict(PDL=False)


def check_triton_device(name: str, tensor: torch.Tensor) -> None:
    """Triton compiles for CUDA; CPU tensors only work under Triton's interpreter (TRITON_INTERPRET=1); meta
    tensors only while launches are recorded under `simulated_device`."""
    device_type = tensor.device.type
    if device_type == "cuda" or (device_type == "cpu" and triton.knobs.runtime.interpret) \
            or (device_type == "meta" and _simulated is not None):
        return
    raise ValueError(
        f"{name} is on {tensor.device}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
        f"hayabusa.kernels is imported to run on CPU"
    )


def check_tensor(name: str, tensor: torch.Tensor, *, ndim: int | None = None, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | tuple[torch.dtype, ...] = SUPPORTED_DTYPES, device: torch.device | None = None,
                 contiguous: bool = True) -> None:
    """Raise ValueError naming `name` when `tensor` has the wrong type, rank/shape, dtype, device or layout.

    dtype: the one accepted dtype, or a tuple of them (by default the float dtypes the kernels support).
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(tensor.stride())} for shape "
                         f"{tuple(tensor.shape)}")


@functools.cache
def row_block(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a kernel that runs one program per row of length n.

    Rows up to 16384 elements are held whole in registers; longer rows are walked in 16384-wide chunks.
    """
    block_n = min(next_power_of_2(n), 16384)
    num_warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    return block_n, num_warps


def interpreted_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """True where Triton's CPU interpreter mishandles bf16: it multiplies bf16 tl.dot operands as their raw
    uint16 bits and truncates fp32 -> bf16 casts instead of rounding to nearest even. Kernels pass it as their
    INTERPRETED_BF16 constexpr to `dot` and `cast_rounded`, which steer around both, so CPU results match a GPU's."""
    return dtype == torch.bfloat16 and device.type == "cpu"


@triton.jit
def round_bf16(x):
    # fp32 -> the nearest bf16 value (ties to even), still held in fp32, so a truncating cast is exact
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """fp32 x cast to dtype, rounding to nearest even (as a GPU's cast does) under the interpreter too."""
    if INTERPRETED_BF16:
        x = round_bf16(x)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """acc + a @ b; under the interpreter bf16 operands are upcast (products of bf16 values are exact in fp32)."""
    if INTERPRETED_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
