"""The paged engine at scale on the torch-reference op set (fast on CPU): load, preemption, errors, threads.

Hundreds of requests of random lengths, greedy and seeded sampling, shared prefixes, on a KV pool far too
small for them: all must finish with exactly the tokens of an unconstrained run. Bad requests fail alone.
"""

import random
import threading

import pytest
import torch

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.model.paged_model import DecodeInputs
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.worker.shape_buckets import graph_batch_sizes
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model
from tolerance import assert_close

TOKENIZER = Tokenizer.from_pretrained()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    _, config, state_dict = random_hf_model(41, hidden=160, heads=2, layers=2, vocab=101, max_positions=64)
    return config, state_dict


def make_engine(model, **kwargs) -> PagedEngine:
    config, state_dict = model
    return PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", **kwargs)


def random_requests(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    families = [[rng.randrange(100) for _ in range(12)] for _ in range(4)]  # shared prompt prefixes
    prompts, params = [], []
    for i in range(count):
        prefix = families[rng.randrange(4)][:rng.randrange(13)] if rng.random() < 0.5 else []
        prompts.append(prefix + [rng.randrange(100) for _ in range(rng.randint(1, 20))])
        if i % 3 == 2:
            params.append(SamplingParams(max_new_tokens=rng.randint(1, 12), do_sample=True, temperature=0.8,
                                         top_k=20, top_p=0.9, seed=i))
        else:
            params.append(SamplingParams(max_new_tokens=rng.randint(1, 12), repetition_penalty=1.0 + (i % 2) * 0.3))
    return prompts, params


def test_hundreds_of_requests_on_a_tiny_pool_match_an_unconstrained_run(model) -> None:
    prompts, params = random_requests(200, seed=0)
    unconstrained = make_engine(model, kv_cache_blocks=4096, block_size=4, max_num_seqs=200)
    expected = unconstrained.generate(prompts, params)

    # 12 blocks of 4 = 48 token slots for 200 requests of up to 44 tokens each.
    tight = make_engine(model, kv_cache_blocks=12, block_size=4, max_num_seqs=8)
    preemptions = []
    preempt = tight.scheduler.preempt
    tight.scheduler.preempt = lambda seq: (preemptions.append(seq.seq_id), preempt(seq))
    actual = tight.generate(prompts, params)

    assert len(preemptions) > 20  # the pool really was too small
    assert len(actual) == len(prompts)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.prompt_token_ids == prompts[i]
        assert (a.token_ids, a.finish_reason, a.text) == (e.token_ids, e.finish_reason, e.text), f"request {i}"
    for engine in (tight, unconstrained):
        manager = engine.block_manager
        assert manager.num_free_blocks == manager.num_blocks and not engine.has_unfinished_requests()


def test_greedy_tokens_equal_the_reference_loop(model) -> None:
    config, state_dict = model
    prompts = [[7] * n + [1, 2, 3][: n % 3 + 1] for n in (1, 5, 9, 14, 22)]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True)] * len(prompts)
    expected = reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts, params)
    actual = make_engine(model, kv_cache_blocks=10, block_size=4).generate(prompts, params)
    assert [out.token_ids for out in actual] == [out.token_ids for out in expected]


def test_bad_requests_fail_alone_while_the_rest_proceed(model) -> None:
    engine = make_engine(model, kv_cache_blocks=6, block_size=4)  # 24 token slots; context 64
    good = SamplingParams(max_new_tokens=4)
    requests = [
        ([1, 2, 3], good),
        ([5] * 70, good),  # longer than the context
        ([5] * 10, SamplingParams(max_new_tokens=60)),  # max_new_tokens runs past the context
        ([5] * 20, SamplingParams(max_new_tokens=10)),  # fits the context, never the pool
        ([1, 101], good),  # token id outside the vocabulary
        ([], good),  # empty prompt
        ([4, 5, 6], {"max_new_tokens": 4}),  # not a SamplingParams
        ([7, 8], good),
    ]
    outputs = engine.generate([r[0] for r in requests], [r[1] for r in requests])
    failed = {i: out.error for i, out in enumerate(outputs) if out.finish_reason == "error"}
    assert sorted(failed) == [1, 2, 3, 4, 5, 6]
    assert "request 1: 70 prompt tokens + max_new_tokens 4 = 74 exceed the context length 64" in failed[1]
    assert "max_new_tokens 60 = 70 exceed the context length 64" in failed[2]
    assert "need 8 KV blocks of 4 tokens; the pool holds only 6" in failed[3]
    assert "the prompt holds token id 101 outside the vocabulary [0, 101)" in failed[4]
    assert "the prompt is empty" in failed[5]
    assert "params must be a SamplingParams, got dict" in failed[6]
    assert all(outputs[i].finish_reason == "error" and outputs[i].token_ids == [] for i in failed)
    for i in (0, 7):
        assert outputs[i].finish_reason in ("stop", "length") and outputs[i].token_ids
    with pytest.raises(ValueError, match="need 8 KV blocks"):
        engine.add_request([5] * 20, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="exceed the context length"):
        engine.stream([5] * 70, good)


def test_threads_and_streams_get_the_same_outputs_as_one_batch(model) -> None:
    prompts, params = random_requests(24, seed=1)
    expected = make_engine(model, kv_cache_blocks=512, block_size=4).generate(prompts, params)
    engine = make_engine(model, kv_cache_blocks=16, block_size=4, max_num_seqs=4)
    results: dict[int, object] = {}
    errors = []

    def worker(start: int) -> None:
        try:
            for i in range(start, len(prompts), 4):
                if i % 2:
                    results[i] = "".join(engine.stream(prompts[i], params[i]))
                else:
                    (results[i],) = engine.generate([prompts[i]], [params[i]])
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(start,)) for start in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads)
    for i, e in enumerate(expected):
        if i % 2:
            assert results[i] == e.text, f"stream {i}"
        else:
            assert results[i].token_ids == e.token_ids, f"request {i}"
    assert engine.block_manager.num_free_blocks == 16


def test_closing_a_stream_early_aborts_the_request(model) -> None:
    engine = make_engine(model, kv_cache_blocks=8, block_size=4)
    stream = engine.stream([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=20, ignore_eos=True))
    next(iter(stream))
    assert engine.block_manager.num_free_blocks < 8
    stream.close()
    assert engine.block_manager.num_free_blocks == 8 and not engine.has_unfinished_requests()


def test_a_failing_step_fails_every_waiting_request(model) -> None:
    engine = make_engine(model, kv_cache_blocks=8, block_size=4)

    def broken(plan):
        raise torch.cuda.OutOfMemoryError("simulated")

    engine.runner.launch = broken
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.generate([[1, 2], [3, 4]], [SamplingParams(max_new_tokens=4)] * 2)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == 8


def test_padding_rows_of_a_graph_sized_decode_batch_change_nothing(model) -> None:
    """CUDA graphs replay a bigger batch with rows at position -1; the real rows and the cache must not notice."""
    engine = make_engine(model, kv_cache_blocks=8, block_size=4)
    assert graph_batch_sizes(1) == [1] and graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    runner = engine.runner
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_new_tokens=4))
    engine.step()  # prefill: the sampled tokens sit in the next decode's input buffer, last_token[0:2]
    plan = engine.scheduler.schedule()
    assert not plan.is_mixed and plan.new_blocks == []  # both tokens' blocks are in the tables already
    inputs = DecodeInputs(input_ids=runner.sampler.last_token[:2].clone(), positions=torch.from_numpy(plan.positions),
                          block_tables=runner.block_tables[:2].clone())
    caches_before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    exact = runner.model.decode(inputs, runner.kv_caches)
    caches_exact = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, caches_before, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    padded = DecodeInputs(
        input_ids=torch.cat([inputs.input_ids, torch.zeros(2, dtype=torch.int64)]),
        positions=torch.cat([inputs.positions, torch.full((2,), -1, dtype=torch.int32)]),
        block_tables=torch.cat([inputs.block_tables, torch.zeros(2, inputs.block_tables.shape[1], dtype=torch.int32)]),
    )
    logits = runner.model.decode(padded, runner.kv_caches)
    assert_close(logits[:2], exact, torch.float32, name="real rows")  # a GEMM of 4 rows may round unlike one of 2
    written = torch.zeros(runner.kv_caches[0][0].shape[:2], dtype=torch.bool)  # [blocks, slots]
    for seq, position in zip(plan.seqs, plan.positions.tolist(), strict=True):
        written[seq.block_table[position // 4], position % 4] = True
    for (k, v), (k0, v0), (k1, v1) in zip(runner.kv_caches, caches_before, caches_exact, strict=True):
        assert torch.equal(k[~written], k0[~written]) and torch.equal(v[~written], v0[~written])  # padding: no write
        assert_close(k[written], k1[written], torch.float32, name="k of the real rows")
        assert_close(v[written], v1[written], torch.float32, name="v of the real rows")
