"""The paged engine's step loop (torch op set, CPU): tokens read back one step late change no output.

Stops (eos, stop strings, max_new_tokens), aborts, preemption and non-finite logits all meet a sequence whose
next token is already in flight; the outputs must equal the reference loop's, which has no lag. Also: seeded
sampling independent of batch neighbours and slot moves, the RequestUpdate / abort / stats surface under several
threads, warm-up and the padded (bucketed) shapes, and the CPU KV pool sizing.
"""

import math
import threading
from dataclasses import replace

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.loading.tensor_names import EMBED_IN
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sample.sampler import SamplerMode
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.worker import kv_cache
from hayabusa.engine.worker.shape_buckets import graph_batch_sizes, prefill_bucket, prefill_buckets

from paged_engine import SAMPLED, TOKENIZER, make_engine, small_model

PROMPTS = [[5, 17, 9, 3], [77, 1, 2, 3, 4, 5], [30, 31], [8] * 7, [40, 41, 42, 43, 44]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return small_model()


def reference(config, state_dict, prompts, params):
    return reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts, params)


def spy_sampling_rows(engine: PagedEngine) -> dict[int, int]:
    """Count, per request, the rows launched that sample a token for it (its prefill and its decode rows)."""
    rows: dict[int, int] = {}
    launch = engine.runner.launch

    def counting_launch(plan):
        for seq, count in zip(plan.seqs, plan.tokens_per_row.tolist(), strict=True):
            rows[seq.seq_id] = rows.get(seq.seq_id, 0) + int(count)
        return launch(plan)

    engine.runner.launch = counting_launch
    return rows


def spy_shapes(engine: PagedEngine, shapes: list[tuple[str, int]]) -> None:
    """Record the rows of every decode (batch) and prefill (tokens) the model runs."""
    decode, prefill = engine.model.decode, engine.model.prefill
    engine.model.decode = lambda inputs, kv, **kw: (shapes.append(("decode", len(inputs.positions))),
                                                    decode(inputs, kv, **kw))[1]
    engine.model.prefill = lambda inputs, kv: (shapes.append(("prefill", len(inputs.input_ids))),
                                               prefill(inputs, kv))[1]


def drive(engine: PagedEngine) -> list:
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    return updates + engine.step()  # read back the last step in flight (its rows are all stale by now)


def assert_same(actual, expected) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert (a.token_ids, a.text, a.finish_reason) == (e.token_ids, e.text, e.finish_reason), f"request {i}"


def test_stops_read_back_a_step_late_change_no_output(model) -> None:
    config, state_dict = model
    free_run = reference(config, state_dict, PROMPTS, [SamplingParams(max_new_tokens=12, ignore_eos=True)] * 5)
    eos = free_run[0].token_ids[3]  # request 0 meets this "eos" within its first 4 tokens
    stop = free_run[1].text[5:8]  # spans the 3rd and 4th tokens of request 1 (2 characters each)
    config = replace(config, eos_token_id=eos)
    params = [SamplingParams(max_new_tokens=12),
              SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)),
              SamplingParams(max_new_tokens=2, ignore_eos=True),
              replace(SAMPLED, stop=("しま",)),
              SamplingParams(max_new_tokens=12, ignore_eos=True)]
    expected = reference(config, state_dict, PROMPTS, params)
    assert [e.finish_reason for e in expected[:3]] == ["stop", "stop", "length"]
    assert len(expected[0].token_ids) <= 4 and stop not in expected[1].text and len(expected[1].token_ids) < 12

    engine = make_engine(config, state_dict)
    sampled_rows = spy_sampling_rows(engine)
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, params, strict=True)]
    updates = drive(engine)
    finished = {u.request_id: u.finished for u in updates if u.finished is not None}
    assert_same([finished[i] for i in ids], expected)
    # The device sampled one token past each stop it could not know of yet (discarded), never past the length.
    for i, e, q in zip(ids, expected, params, strict=True):
        assert sampled_rows[i] == len(e.token_ids) + (e.finish_reason == "stop" and len(e.token_ids) < q.max_new_tokens)
    for i in ids:  # the update stream: tokens and text add up, and the final output comes last, once
        mine = [u for u in updates if u.request_id == i]
        assert sum((u.new_token_ids for u in mine), []) == finished[i].token_ids
        assert "".join(u.text_delta for u in mine) == finished[i].text
        assert [u.finished is not None for u in mine] == [False] * (len(mine) - 1) + [True]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_aborts_with_a_token_in_flight_or_still_waiting(model) -> None:
    config, state_dict = model
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = reference(config, state_dict, PROMPTS[:3], [params] * 3)
    engine = make_engine(config, state_dict, max_num_seqs=2)
    ids = [engine.add_request(p, params) for p in PROMPTS[:3]]  # the third waits for a slot
    updates = engine.step() + engine.step() + engine.step()
    engine.abort(ids[0])  # running, with a token in flight
    engine.abort(ids[2])  # still waiting
    engine.abort(10_000)  # never issued: ignored
    assert engine.stats().num_waiting == 0
    updates += drive(engine)
    engine.abort(ids[1])  # finished already: ignored
    finished = {u.request_id: u.finished for u in updates if u.finished is not None}
    aborted = finished[ids[0]]
    assert (aborted.finish_reason, aborted.error) == ("abort", "aborted")
    assert 0 < len(aborted.token_ids) < 10 and aborted.token_ids == expected[0].token_ids[: len(aborted.token_ids)]
    assert aborted.text == TOKENIZER.decode(aborted.token_ids)
    assert (finished[ids[2]].finish_reason, finished[ids[2]].token_ids) == ("abort", [])
    assert_same([finished[ids[1]]], expected[1:2])
    assert engine.stats() == type(engine.stats())(num_running=0, num_waiting=0, num_free_blocks=64, num_blocks=64)


def test_preemption_reads_the_tokens_in_flight_first(model) -> None:
    config, state_dict = model
    prompts = [[3, 14, 15, 92, 65], [27, 18, 28, 18, 28], [1, 2, 3, 4, 5], [9, 9, 8, 8, 7]]
    params = [SamplingParams(max_new_tokens=9, ignore_eos=True), SAMPLED] * 2
    expected = reference(config, state_dict, prompts, params)
    engine = make_engine(config, state_dict, kv_cache_blocks=9, max_num_seqs=4)  # 36 token slots for 4 x 14
    drains, preemptions = [], []
    schedule, preempt = engine.scheduler.schedule, engine.scheduler.preempt

    def spying_schedule(results_in_flight=False):
        plan = schedule(results_in_flight)
        drains.append(plan is None)
        return plan

    engine.scheduler.schedule = spying_schedule
    engine.scheduler.preempt = lambda seq: (preemptions.append(seq.seq_id), preempt(seq))
    assert_same(engine.generate(prompts, params), expected)
    assert preemptions and any(drains)  # blocks ran short while tokens were in flight
    assert engine.block_manager.num_free_blocks == 9


def test_non_finite_logits_fail_that_request_alone(model) -> None:
    config, state_dict = model
    clean = SamplingParams(max_new_tokens=6, ignore_eos=True)
    free_run = reference(config, state_dict, PROMPTS, [clean] * 5)
    poison = free_run[0].token_ids[2]  # request 0 generates it as its third token
    assert all(poison not in p for p in PROMPTS) and all(poison not in free_run[i].token_ids for i in (1, 4))
    weights = dict(state_dict)
    weights[EMBED_IN] = weights[EMBED_IN].clone()
    weights[EMBED_IN][poison] = math.nan  # any hidden state it enters becomes NaN, and so do the logits
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2] + [poison], PROMPTS[3][:2] + [poison], PROMPTS[4]]
    params = [clean, clean, SAMPLED, clean, clean]
    outputs = make_engine(config, weights).generate(prompts, params)
    for i in (0, 2, 3):
        assert outputs[i].finish_reason == "error" and "non-finite logits" in outputs[i].error, i
    assert outputs[2].token_ids == [] and outputs[3].token_ids == []  # general and greedy sampler paths
    assert outputs[0].token_ids == free_run[0].token_ids[:3]  # failed at its 4th token, after the poisoned one
    assert_same([outputs[1], outputs[4]], [free_run[1], free_run[4]])


def test_seeded_tokens_do_not_depend_on_neighbours_slots_or_runs(model) -> None:
    config, state_dict = model
    prompt = PROMPTS[4]
    alone = make_engine(config, state_dict).generate([prompt], [SAMPLED])[0].token_ids
    assert make_engine(config, state_dict).generate([prompt], [SAMPLED])[0].token_ids == alone
    engine = make_engine(config, state_dict, max_num_seqs=4)
    moves = []
    launch = engine.runner.launch
    engine.runner.launch = lambda plan: (moves.append(plan.slot_moves[0]), launch(plan))[1]
    neighbours = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 3)]
    outputs = engine.generate([PROMPTS[0], PROMPTS[1], prompt, PROMPTS[3]],
                              neighbours + [SAMPLED, replace(SAMPLED, seed=8, max_new_tokens=1)])
    assert outputs[2].token_ids == alone
    assert any(moves)  # its neighbours finished first: it changed slot (its device state moved with it)
    assert reference(config, state_dict, [prompt], [SAMPLED])[0].token_ids == alone


def test_threads_share_the_engine_through_updates_generate_stream_and_abort(model) -> None:
    config, state_dict = model
    params = [SamplingParams(max_new_tokens=6 + i % 4, ignore_eos=True) if i % 3 else SAMPLED for i in range(12)]
    prompts = [PROMPTS[i % 5] + [i] for i in range(12)]
    expected = make_engine(config, state_dict).generate(prompts, params)
    engine = make_engine(config, state_dict, kv_cache_blocks=20, max_num_seqs=4)
    results, errors, served = {}, [], {}

    def server() -> None:  # a serving loop: add_request + step
        ids = {engine.add_request(prompts[i], params[i]): i for i in range(0, 6)}
        engine.abort(min(ids))  # possibly before it even started
        unfinished = set(ids)
        while unfinished:
            for update in engine.step():
                served.setdefault(update.request_id, []).append(update)
                if update.finished is not None:
                    results[ids[update.request_id]] = update.finished
                    unfinished.discard(update.request_id)

    def generator(indices) -> None:
        for i, out in zip(indices, engine.generate([prompts[i] for i in indices], [params[i] for i in indices]),
                          strict=True):
            results[i] = out

    def streamer() -> None:
        results[10] = "".join(engine.stream(prompts[10], params[10]))
        stream = engine.stream(prompts[11], params[11])
        results[11] = next(stream)
        stream.close()  # aborts it

    def guarded(target, *args):
        def run():
            try:
                target(*args)
            except Exception as err:  # surfaced in the main thread below
                errors.append(err)
        return threading.Thread(target=run)

    threads = [guarded(server), guarded(generator, [6, 7]), guarded(generator, [8, 9]), guarded(streamer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert results[0].finish_reason == "abort"
    assert results[0].token_ids == expected[0].token_ids[: len(results[0].token_ids)]
    assert_same([results[i] for i in range(1, 10)], expected[1:10])
    assert results[10] == expected[10].text and expected[11].text.startswith(results[11])
    for updates in served.values():  # each server request: its tokens and text add up to its final output
        assert sum((u.new_token_ids for u in updates), []) == updates[-1].finished.token_ids
        assert "".join(u.text_delta for u in updates) == updates[-1].finished.text
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, 20)


def test_padded_shapes_change_no_token(model) -> None:
    """The triton op set pads decode batches to graph sizes and prefill tokens to buckets; forced on the torch
    set here (fast on CPU), the padding rows must leave every real token as it was."""
    config, state_dict = model
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True), SAMPLED, SAMPLED, SamplingParams(max_new_tokens=3)]
    engine = make_engine(config, state_dict, max_num_seqs=8)
    engine.runner.bucketed = True
    shapes = []
    spy_shapes(engine, shapes)
    assert_same(engine.generate(PROMPTS[:4], params), reference(config, state_dict, PROMPTS[:4], params))
    assert ("prefill", 32) in shapes  # 19 prompt tokens, padded
    assert {size for kind, size in shapes if kind == "decode"} <= set(graph_batch_sizes(8))


def test_warm_up_runs_every_shape_the_engine_can_launch(model) -> None:
    config, state_dict = model
    assert prefill_buckets(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    for max_tokens in (1, 5, 256, 257, 1000):
        buckets = prefill_buckets(max_tokens)
        assert all(t <= prefill_bucket(t) in buckets for t in range(1, max_tokens + 1))
    engine = make_engine(config, state_dict, max_num_seqs=20, max_num_batched_tokens=300)
    shapes = []
    spy_shapes(engine, shapes)
    engine.runner.warm_up(prefill=True, progress=False)
    # Each decode batch size once per sampler mode; prefill buckets capped at the token budget.
    assert sorted(shapes) == sorted([("decode", b) for b in graph_batch_sizes(20)] * len(SamplerMode)
                                    + [("prefill", min(t, 300)) for t in prefill_buckets(300)])
    assert_same(engine.generate(PROMPTS, [SAMPLED] * 5), reference(config, state_dict, PROMPTS, [SAMPLED] * 5))


@pytest.mark.filterwarnings("ignore::hayabusa.engine.platform.devices.InterpreterWarning")  # nothing interpreted here
def test_backends_run_the_paged_engine_and_the_cpu_pool_fits_the_ram(model, monkeypatch) -> None:
    config, state_dict = model
    assert Engine(config, state_dict, TOKENIZER, backend="reference", device=torch.device("cpu")).paged.model.ops.name \
        == "torch"
    assert Engine(config, state_dict, TOKENIZER, backend="triton", device=torch.device("cpu"),
                  kv_cache_blocks=4).paged.model.ops.name == "triton"
    full = kv_cache.CPU_DEFAULT_SEQUENCES * 16  # 64 positions in blocks of 4
    assert make_engine(config, state_dict, kv_cache_blocks=None).runner.num_kv_blocks == full
    block_bytes = kv_cache.kv_block_bytes(config, 4, torch.float32)
    available = 2 * full * block_bytes  # half of it would hold the full pool, were it not for the activations
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: available)
    engine = make_engine(config, state_dict, kv_cache_blocks=None, max_num_seqs=4, max_num_batched_tokens=64)
    assert 0 < engine.runner.num_kv_blocks < full
    assert engine.runner.num_kv_blocks * block_bytes <= available * kv_cache.CPU_KV_MEMORY_FRACTION
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 1 << 10)
    with pytest.raises(ValueError, match="pass kv_cache_blocks"):
        make_engine(config, state_dict, kv_cache_blocks=None)


@pytest.mark.parametrize("chunked_prefill", [True, False])
def test_prompt_chunks_beside_decodes_change_no_token(model, chunked_prefill: bool) -> None:
    """A budget of 5 tokens splits every longer prompt into chunks that run beside the decodes (or, unchunked,
    whole prompts in steps of their own); a small pool adds preemption and recompute in chunks, and shared prefixes
    add cache hits. Greedy and seeded outputs equal the reference loop's."""
    config, state_dict = model
    prompts = [PROMPTS[i % 5] * (1 + i % 3) + [i] for i in range(10)]
    params = [SamplingParams(max_new_tokens=6 + i % 5, ignore_eos=True) if i % 3 else SAMPLED for i in range(10)]
    budget = 5 if chunked_prefill else 64
    engine = make_engine(config, state_dict, kv_cache_blocks=12, max_num_seqs=4, max_num_batched_tokens=budget,
                         chunked_prefill=chunked_prefill)
    plans = []
    launch = engine.runner.launch
    engine.runner.launch = lambda plan: (plans.append(plan), launch(plan))[1]
    preempt = engine.scheduler.preempt
    preempted = []
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), preempt(seq))
    assert_same(engine.generate(prompts, params), reference(config, state_dict, prompts, params))
    mixed = [plan for plan in plans if plan.chunks and plan.tokens_per_row[[r for r in range(plan.num_rows)
                                                                           if r not in plan.chunks]].any()]
    cut = [plan for plan in plans if any(not plan.tokens_per_row[row] for row in plan.chunks)]
    assert bool(mixed) == bool(cut) == chunked_prefill  # decodes beside chunks, and prompts cut short of the end
    assert preempted and engine.block_manager.num_free_blocks == 12
