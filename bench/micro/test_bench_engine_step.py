"""Microbenchmark: the host's work in one decode step of the paged engine, with the device's work stubbed out.

`pytest bench/micro/test_bench_engine_step.py --benchmark-only` (CPU). One timed round is one `PagedEngine.step()`
in steady decoding: planning (scheduler, block appends), the packed input upload, the read-back of the previous
step's ids, appending them to their requests, detokenizing, stop checks and building the RequestUpdates
(the server's path). The stub stands where a GPU replays the captured decode graph: it writes the step's sampled
ids into the next step's input buffer, as the graph's sampler does, and computes nothing. Cases: batch 1, and
batch 256 with 2048-token contexts. Targets (issue 9.3): <= 50 us at batch 1, <= 1 ms at batch 256.

On a shared machine add `--benchmark-timer=time.process_time`: the CPU time of this process is the host work
itself, without the time the process spends descheduled while other jobs run.
"""

from __future__ import annotations

import pytest
import torch

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model

CONTEXT = 2048  # prompt tokens per request
ROUNDS = 300  # timed steps; each adds a token to every request
MAX_NEW_TOKENS = 2 * ROUNDS  # more than the set-up, warm-up and timed steps sample
TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた。"


def decoding_engine(batch: int) -> PagedEngine:
    """An engine whose `batch` requests have passed their prefill and decode at CONTEXT tokens, device stubbed."""
    tokenizer = Tokenizer.from_pretrained()
    _, config, state_dict = random_hf_model(0, hidden=32, heads=2, layers=1, vocab=tokenizer.vocab_size,
                                            max_positions=2 * CONTEXT)
    engine = PagedEngine(config, state_dict, tokenizer, device="cpu", ops="torch", block_size=16,
                         max_num_seqs=batch, kv_cache_blocks=batch * -(-(CONTEXT + MAX_NEW_TOKENS) // 16))
    runner = engine.runner
    text_ids = torch.tensor(tokenizer.encode(TEXT))
    num_steps = 2 * ROUNDS + 64
    long_ids = text_ids.repeat((CONTEXT + num_steps + batch) // len(text_ids) + 1)
    # Row `row` reads the text from token `row` on, so every row holds (and detokenizes) different real text.
    sampled = iter(torch.stack([long_ids[row: row + num_steps] for row in range(batch)], dim=1))  # [steps, batch]
    next_input_ids = runner.sampler.last_token[:batch]

    def device_step(graph_batch: int, mode: object, views: dict) -> None:
        next_input_ids.copy_(next(sampled))

    runner._decode_body = device_step
    runner.model.prefill = lambda inputs, kv_caches: torch.zeros(inputs.last_token_rows.shape[0],
                                                                 config.vocab_size)
    prompts = [long_ids[row: row + CONTEXT].tolist() for row in range(batch)]
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    while engine.scheduler.waiting or engine.scheduler.prefilling:  # prompts run in chunks beside the decodes
        engine.step()
    for _ in range(3):  # reach steady decoding: every request has a token in flight and a few read back
        engine.step()
    return engine


@pytest.mark.parametrize("batch", [1, 256])
def test_host_time_of_a_decode_step(benchmark, batch: int) -> None:
    engine = decoding_engine(batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host's ops are tiny; one thread is what the driving thread gets
    try:
        updates = benchmark.pedantic(engine.step, rounds=ROUNDS, iterations=1, warmup_rounds=5)
    finally:
        torch.set_num_threads(threads)
    assert len(updates) == batch and all(len(u.new_token_ids) == 1 and u.finished is None for u in updates)
    assert engine.stats().num_running == batch
    if benchmark.stats is not None:
        benchmark.extra_info.update(batch=batch, context_tokens=CONTEXT)
