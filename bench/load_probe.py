"""One engine start in a fresh process, timed: `python -m hayabusa.bench.load_probe MODEL_DIR DTYPE DEVICE BACKEND`
prints {"load_ms": ...} on its last line: checkpoint directory to an engine ready to generate (on a GPU that
includes compiling the Triton kernels, or reading them from TRITON_CACHE_DIR, and capturing the decode graphs).
Imports are not timed. The load scenario runs it on one fresh TRITON_CACHE_DIR twice: a cold start, then a warm
one, as a restarted server sees them (scenarios.triton_cache_starts)."""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    model_dir, dtype_name, device, backend = sys.argv[1:] if argv is None else argv
    import torch

    from hayabusa.engine.api import Engine
    from hayabusa.engine.config import DTYPES

    start = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, dtype=DTYPES[dtype_name], device=device, backend=backend)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    print(json.dumps({"load_ms": (time.perf_counter() - start) * 1e3}))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
