"""Host <-> device transfers of the step loop: one packed upload of a step's inputs, one read-back of its results.

Uploads: the host writes a step's small inputs (positions, new block-table entries, a prefill's tokens) with numpy
into one host buffer, and one async copy moves them to a device buffer whose views the model reads (a captured
graph reads the same addresses on every replay). Read-back: the sampled ids and row maxima (and a step's logprobs,
when a request asked) go to host memory with an async copy and an event; the host waits on the event only when it
processes that step, one step later.

On CUDA the host buffers are pinned, so both copies are truly asynchronous, and each side keeps a ring of two: the
buffer a step writes was last used two steps ago, whose results have been read (so its copies are done). On a CPU
the same code runs and every copy is synchronous.

Every field starts 16 bytes into the buffer or a multiple of 16 further: Triton compiles a kernel variant per
pointer argument's 16-byte divisibility, so fields placed by the lengths before them (cu_seqlens after T positions,
context_lens after S + 1 cu_seqlens) would flip between variants with the step's lengths and recompile mid-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hayabusa.engine.sample.logprobs import DeviceLogprobs, StepLogprobs

RING = 2
FIELD_ALIGNMENT = 16  # bytes: what Triton specializes pointer arguments on
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}

Field = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape)


@dataclass
class Layout:
    """Fields packed at FIELD_ALIGNMENT-byte offsets; views of each host ring buffer and of the device buffer."""

    nbytes: int
    host: list[dict[str, np.ndarray]]  # per ring buffer
    device: dict[str, Tensor]
    host_bytes: list[Tensor]  # per ring buffer, its first nbytes: what one upload copies
    device_bytes: Tensor


class PackedUpload:
    def __init__(self, capacity_bytes: int, device: torch.device) -> None:
        self._pinned = device.type == "cuda"
        self._host = [torch.zeros(capacity_bytes, dtype=torch.uint8, pin_memory=self._pinned) for _ in range(RING)]
        self._host_np = [buffer.numpy() for buffer in self._host]
        self._device = torch.zeros(capacity_bytes, dtype=torch.uint8, device=device)
        self._next = 0

    @property
    def capacity(self) -> int:
        """Bytes one upload can hold."""
        return self._device.numel()

    @staticmethod
    def nbytes(fields: Sequence[Field]) -> int:
        return sum(_aligned(_field_bytes(f)) for f in fields)

    def layout(self, fields: Sequence[Field]) -> Layout:
        offsets, offset = [], 0
        for field in fields:
            offsets.append(offset)
            offset += _aligned(_field_bytes(field))
        if offset > self._device.numel():
            raise ValueError(f"step inputs need {offset} bytes; the upload buffer holds {self._device.numel()}")
        host = [{name: buffer[start:start + _field_bytes((name, dtype, shape))].view(_NUMPY_DTYPES[dtype])
                 .reshape(shape) for (name, dtype, shape), start in zip(fields, offsets, strict=True)}
                for buffer in self._host_np]
        device = {name: self._device[start:start + _field_bytes((name, dtype, shape))].view(dtype).view(shape)
                  for (name, dtype, shape), start in zip(fields, offsets, strict=True)}
        return Layout(offset, host, device, [buffer[:offset] for buffer in self._host], self._device[:offset])

    def host_views(self, layout: Layout) -> dict[str, np.ndarray]:
        """Where the next upload's inputs are written."""
        return layout.host[self._next]

    def upload(self, layout: Layout) -> dict[str, Tensor]:
        """Copy what host_views(layout) holds to the device (async on CUDA); returns the device views."""
        layout.device_bytes.copy_(layout.host_bytes[self._next], non_blocking=self._pinned)
        self._next = (self._next + 1) % RING
        return layout.device


@dataclass
class Readback:
    """One step's results on their way to the host: valid once `event` has completed (CPU: at once)."""

    ids: np.ndarray  # int64 [rows], a view of host memory
    row_max_bits: np.ndarray  # [rows], the row maxima's bit patterns (int16 or int32, by the logits dtype)
    event: torch.cuda.Event | None
    logprobs: StepLogprobs | None = None  # when the step computed any


class ResultRing:
    def __init__(self, max_rows: int, logits_dtype: torch.dtype, bits_dtype: torch.dtype,
                 device: torch.device) -> None:
        self._pinned = device.type == "cuda"
        self._ids = [torch.zeros(max_rows, dtype=torch.int64, pin_memory=self._pinned) for _ in range(RING)]
        self._row_max = [torch.zeros(max_rows, dtype=logits_dtype, pin_memory=self._pinned) for _ in range(RING)]
        self._ids_np = [ids.numpy() for ids in self._ids]
        self._bits_np = [row_max.view(bits_dtype).numpy() for row_max in self._row_max]
        self._events = [torch.cuda.Event() if self._pinned else None for _ in range(RING)]
        self._next = 0

    def copy_out(self, ids: Tensor, row_max: Tensor, rows: slice, sampled_logprobs: DeviceLogprobs | None = None,
                 prompt_logprobs: DeviceLogprobs | None = None) -> Readback:
        """Start copying ids and row maxima [max_rows] (device) to the host; a step's results are rows of them.
        Logprobs, when the step computed any, travel in the same read-back (fresh host buffers: they are rare and
        their size varies).

        The whole buffers travel (a few KB: as fast as a slice, and no per-step slicing on the host)."""
        ring = self._next
        self._ids[ring].copy_(ids, non_blocking=self._pinned)
        self._row_max[ring].copy_(row_max, non_blocking=self._pinned)
        logprobs = None
        if sampled_logprobs is not None or prompt_logprobs is not None:
            logprobs = StepLogprobs(*(None if lp is None else lp.copy_to_host(self._pinned)
                                      for lp in (sampled_logprobs, prompt_logprobs)))
        event = self._events[ring]
        if event is not None:
            event.record()
        self._next = (ring + 1) % RING
        return Readback(self._ids_np[ring][rows], self._bits_np[ring][rows], event, logprobs)

    @staticmethod
    def wait(readback: Readback) -> None:
        if readback.event is not None:
            readback.event.synchronize()


def _field_bytes(field: Field) -> int:
    _, dtype, shape = field
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // FIELD_ALIGNMENT) * FIELD_ALIGNMENT
