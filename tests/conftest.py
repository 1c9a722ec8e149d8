"""Shared test set-up: without a GPU, Triton kernels run under Triton's CPU interpreter."""

import os

from devices import ON_GPU

if not ON_GPU:
    # Must be set before any @triton.jit function is defined (i.e. before hayabusa.kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
