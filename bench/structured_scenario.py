"""`hayabusa bench --scenarios structured`: what structured outputs cost per decode step, at batch 1 and 32.

The same requests (decode_prompt_len random token ids, exactly decode_gen_len new tokens each) run twice on one
hayabusa engine: unconstrained (eos ignored), and constrained by a JSON schema whose one string field needs more
characters than decode_gen_len tokens can write (so every request runs its full length, its mask computed inside a
JSON string, where the most tokens are allowed). A constrained step does more than an unconstrained one: the host
reads it back at once (no one-step-behind overlap), advances each row's grammar, computes the rows' bitmasks
(llguidance, in parallel), uploads them with the step's inputs and runs the step eagerly (no CUDA graph); the
sampler unpacks and applies them on the device. The record's `ms_per_token` is the constrained per-step time,
extra["unconstrained_ms_per_step"] the other, extra["mask_cost_ms_per_step"] the difference.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from hayabusa.bench.records import BenchRecord
from hayabusa.bench.workloads import random_prompts

if TYPE_CHECKING:
    from hayabusa.bench.suite import SuiteSettings

BATCHES = (1, 32)
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4096}}, "required": ["text"]}


def run_structured(settings: SuiteSettings) -> list[BenchRecord]:
    from hayabusa.engine.api import Engine
    from hayabusa.engine.sampling_params import SamplingParams

    sizes = settings.sizes
    # A CPU pool for the largest batch (the engine's own default would hold several full-length sequences).
    blocks = max(BATCHES) * -(-(sizes.decode_prompt_len + sizes.decode_gen_len) // 16) \
        if settings.device.type == "cpu" else None
    engine = Engine.from_pretrained(settings.model_dir, dtype=settings.dtype, device=settings.device,
                                    kv_cache_blocks=blocks)
    gen_len = sizes.decode_gen_len
    plain = SamplingParams(max_new_tokens=gen_len, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=gen_len, structured_outputs={"json": SCHEMA})
    records = []
    try:
        for batch in BATCHES:
            prompts = random_prompts([sizes.decode_prompt_len] * (batch * (sizes.repeats + 1)), seed=9000 + batch)
            times = {}
            for name, params in (("plain", plain), ("constrained", constrained)):
                samples = []
                for repeat in range(sizes.repeats + 1):  # the first is the warm-up (and the grammar's compile)
                    start = time.perf_counter()
                    outs = engine.generate(prompts[repeat * batch:(repeat + 1) * batch], params)
                    samples.append((time.perf_counter() - start) * 1e3)
                    if any(len(out.token_ids) != gen_len for out in outs):
                        raise RuntimeError(f"a {name} request generated other than {gen_len} tokens")
                times[name] = samples
            step_ms = {name: statistics.median(samples[1:]) / gen_len for name, samples in times.items()}
            records.append(BenchRecord(
                "hayabusa", "structured", f"batch{batch}", batch, sizes.decode_prompt_len, gen_len,
                step_ms["constrained"], statistics.median(times["constrained"][1:]),
                batch * 1e3 / step_ms["constrained"], None, None, sizes.repeats, times["constrained"][1:],
                times["constrained"][0],
                {"unconstrained_ms_per_step": step_ms["plain"],
                 "mask_cost_ms_per_step": step_ms["constrained"] - step_ms["plain"],
                 "unconstrained_samples_ms": times["plain"][1:]}))
    finally:
        engine.close()
    return records
