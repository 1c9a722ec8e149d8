"""Where tests run: the GPU when there is one (full shapes), else the CPU (kernels under Triton's interpreter)."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
