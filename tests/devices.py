"""Where tests run: the GPU when there is one, else the CPU (kernels under Triton's interpreter); and at what sizes.

Kernel tests run at the model's full shapes on a GPU and at small shapes on the CPU. HAYABUSA_KERNEL_SHAPES=small
picks the small shapes on a GPU too, for runs that slow every kernel down, such as
`compute-sanitizer --tool memcheck`.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

_SHAPES = os.environ.get("HAYABUSA_KERNEL_SHAPES", "full" if ON_GPU else "small")
if _SHAPES not in ("full", "small"):
    raise ValueError(f"HAYABUSA_KERNEL_SHAPES must be 'full' or 'small', got {_SHAPES!r}")
FULL_SHAPES = ON_GPU and _SHAPES == "full"  # full shapes need a GPU: the interpreter would take hours
