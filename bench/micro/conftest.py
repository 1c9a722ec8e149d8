"""Kernel and tokenizer microbenchmarks (`pytest bench/micro --benchmark-only`); no GPU -> Triton interpreter."""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if ON_GPU else "cpu"
