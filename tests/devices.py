"""Where tests run: the GPU when there is one, else the CPU (kernels under Triton's interpreter); and at what sizes.

Kernel tests run at the model's full shapes on a GPU and at small shapes on the CPU. HAYABUSA_KERNEL_SHAPES=small
picks the small shapes on a GPU too, for runs that slow every kernel down, such as
`compute-sanitizer --tool memcheck`. Their guard bands keep tensors 16-byte aligned, or not (GUARD_ALIGNMENTS).
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

_SHAPES = os.environ.get("HAYABUSA_KERNEL_SHAPES", "full" if ON_GPU else "small")
if _SHAPES not in ("full", "small"):
    raise ValueError(f"HAYABUSA_KERNEL_SHAPES must be 'full' or 'small', got {_SHAPES!r}")
FULL_SHAPES = ON_GPU and _SHAPES == "full"  # full shapes need a GPU: the interpreter would take hours

# Guard bands around kernel tests' tensors (tolerance.Guarded): "aligned" ones keep a tensor's start 16-byte aligned,
# so its kernels compile the variants the engine runs (16-byte vector loads); "odd" ones (257 elements) leave it
# misaligned, so they compile the scalar-load variants. A GPU tests both, every aligned test first; the interpreter
# compiles nothing, so one is enough on a CPU. HAYABUSA_GUARD_ALIGNMENT=aligned, odd or both picks.
_ALIGNMENT = os.environ.get("HAYABUSA_GUARD_ALIGNMENT", "both" if ON_GPU else "odd")
if _ALIGNMENT not in ("aligned", "odd", "both"):
    raise ValueError(f"HAYABUSA_GUARD_ALIGNMENT must be 'aligned', 'odd' or 'both', got {_ALIGNMENT!r}")
GUARD_ALIGNMENTS = ("aligned", "odd") if _ALIGNMENT == "both" else (_ALIGNMENT,)
