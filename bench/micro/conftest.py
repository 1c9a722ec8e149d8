"""Kernel and tokenizer microbenchmarks (`pytest bench/micro --benchmark-only`); no GPU -> Triton interpreter.

ON_GPU comes from tests/devices.py (on pytest's pythonpath, see pyproject.toml), the one place tests and
benchmarks learn where they run; a conftest module cannot be imported reliably by the files it serves.
"""

import os

from devices import ON_GPU

if not ON_GPU:
    # Must be set before any @triton.jit function is defined (the benchmark modules import hayabusa.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")
