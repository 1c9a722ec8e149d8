"""How long running requests wait for their next token when a long prompt arrives: chunked prefill against whole
prompts in steps of their own.

`python -m hayabusa.bench.prefill_gap` (CPU, the `small` random preset, torch op set): 64 requests decode; once they
run steadily a 2048-token prompt arrives. Reported per engine configuration: the median inter-token gap of the 64
before the arrival, the longest gap any of them sees from the arrival until the long prompt's prefill has run, and
how long that prefill took (its first token is sampled then; the host reads it one step later). The window ends
there because the decode steps after it, with a 2048-token context in the batch, cost the same in every
configuration.

On a shared machine wall-clock gaps swing with the neighbours' load, so the default clock is this thread's CPU time
with one torch thread (`--clock thread`): the work between two tokens, what an idle machine's wall clock would show.
`--clock wall` times the wall clock; either way run it under `flock /work/heavy.lock` and note the load (printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from hayabusa.engine.api import load_pretrained
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.sampling_params import SamplingParams

NUM_RUNNING = 64
LONG_PROMPT_TOKENS = 2048


def measure(engine: PagedEngine, clock: Callable[[], float], *, steady_steps: int = 6) -> dict[str, float]:
    """Run the scenario on a fresh engine; gaps in milliseconds."""
    running = {engine.add_request([100 + i, 200 + i, 300 + i, 400 + i], SamplingParams(max_new_tokens=200,
                                                                                       ignore_eos=True)): i
               for i in range(NUM_RUNNING)}
    last_seen: dict[int, float] = {}
    steady_gaps: list[float] = []
    for _ in range(steady_steps + 3):  # prefill the 64, then decode steadily
        updates = engine.step()
        now = clock()
        for update in updates:
            if update.request_id in last_seen and len(last_seen) == NUM_RUNNING:
                steady_gaps.append(now - last_seen[update.request_id])
            last_seen[update.request_id] = now
    arrival = clock()
    engine.add_request([(7 * i) % 30000 + 1 for i in range(LONG_PROMPT_TOKENS)],
                                 SamplingParams(max_new_tokens=4, ignore_eos=True))
    gaps: list[float] = []
    while engine.scheduler.waiting or engine.scheduler.prefilling:  # until the long prompt's last chunk has run
        updates = engine.step()
        now = clock()
        for update in updates:
            if update.request_id in running:
                gaps.append(now - max(last_seen[update.request_id], arrival))
                last_seen[update.request_id] = now
    prefilled = clock()  # on a CPU the step that sampled the long prompt's first token has run
    for request_id in running:  # a request still waiting since its last token counts too
        gaps.append(prefilled - max(last_seen[request_id], arrival))
    return {"steady_gap_ms": 1000 * statistics.median(steady_gaps), "longest_gap_ms": 1000 * max(gaps),
            "long_prompt_ttft_ms": 1000 * (prefilled - arrival)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 128],
                        help="max_num_batched_tokens of the chunked runs")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(1 if args.clock == "thread" else min(2, os.cpu_count() or 1))
    _, config, state_dict, tokenizer = load_pretrained("small", dtype=torch.float32, device=torch.device("cpu"))
    config = replace(config, max_position_embeddings=2 * LONG_PROMPT_TOKENS)  # rotary: no weights depend on it
    blocks = NUM_RUNNING * 14 + LONG_PROMPT_TOKENS // 16 + 8  # 64 x 204 tokens and the long prompt, in blocks of 16
    configurations = [("whole prompts (before)", dict(chunked_prefill=False))]
    configurations += [(f"chunked, {budget} tokens per step", dict(max_num_batched_tokens=budget))
                       for budget in args.budgets]
    print(f"clock: {args.clock}, {torch.get_num_threads()} torch thread(s); load before: {os.getloadavg()}")
    print("| engine | median gap before (ms) | longest gap (ms) | long prompt's prefill (ms) |\n|---|---|---|---|")
    for index, (name, options) in enumerate(configurations):
        for _ in range(2 if index == 0 else 1):  # the first run warms the allocator and the thread pool up
            engine = PagedEngine(config, state_dict, tokenizer, device="cpu", ops="torch", kv_cache_blocks=blocks,
                                 max_num_seqs=NUM_RUNNING + 1, **options)
            result = measure(engine, clock)
        print(f"| {name} | {result['steady_gap_ms']:.0f} | {result['longest_gap_ms']:.0f} | "
              f"{result['long_prompt_ttft_ms']:.0f} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
