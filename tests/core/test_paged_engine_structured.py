"""Structured outputs in the paged engine, on the tiny random-weight model (real vocabulary, noise for text): every
constrained output is a whole match of its JSON schema, regex, choices or grammar, over hundreds of seeded samples
in batches mixed with unconstrained requests (which come out as they do alone), with chunked prefill and preemption,
for greedy, sampling, n, best_of and beams; compiled grammars are cached; a constraint that max_new_tokens cuts short
says so; options that leave no token allowed fail the request alone. `-m structured_exhaustive` runs thousands of
samples (HAYABUSA_STRUCTURED_SAMPLES per kind, default 1000)."""

import os
import random
import re

import pytest
import torch

from hayabusa.engine import Engine, SamplingParams
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.structured_outputs import StructuredOutputs

from paged_engine import TOKENIZER, small_model
from structured_cases import CONSTRAINTS, MAX_NEW_TOKENS, assert_matches

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def engine():
    # 48 blocks of 16 tokens for batches of up to 64 requests of up to ~210 tokens: preemption; 24 tokens per step:
    # every prompt beside the decode rows runs in chunks.
    eng = Engine.from_pretrained("tiny", dtype=torch.float32, device="cpu", backend="reference", kv_cache_blocks=48,
                                 max_num_batched_tokens=24)
    yield eng
    eng.close()


def count_preemptions(engine: Engine) -> list[int]:
    calls = []
    preempt = engine.paged.scheduler.preempt

    def counting(seq):
        calls.append(seq.seq_id)
        preempt(seq)

    engine.paged.scheduler.preempt = counting
    return calls


def mixed_batch(rng: random.Random, kinds: list[str], size: int, sampled: bool
                ) -> tuple[list[list[int]], list[SamplingParams]]:
    """size requests of random prompts (so that greedy outputs differ too), greedy or seeded sampling (with one
    greedy row in eight: a step samples in the mode its richest row needs): constrained ones of each kind, and one
    unconstrained in four."""
    prompts, params = [], []
    for i in range(size):
        prompts.append([rng.randrange(1, 31000) for _ in range(rng.randint(1, 40))])
        sampled_row = sampled and i % 8 != 5
        sampling = dict(do_sample=True, temperature=rng.choice([0.7, 1.0, 1.5]), top_k=rng.choice([0, 50]),
                        top_p=rng.choice([1.0, 0.9]), seed=rng.randint(0, 1 << 30)) if sampled_row else {}
        if i % 4 == 3:
            params.append(SamplingParams(max_new_tokens=rng.randint(1, 30), **sampling))
            continue
        kind = kinds[i % len(kinds)]
        params.append(SamplingParams(max_new_tokens=MAX_NEW_TOKENS[kind], structured_outputs=CONSTRAINTS[kind],
                                     **sampling))
    return prompts, params


def check_batch(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> int:
    """Run the batch; every constrained output matches, every other one equals its request run alone. Returns how
    many constrained outputs were checked."""
    outs = engine.generate(prompts, params)
    checked = 0
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        if p.structured_outputs is None:
            assert out.structured_output_complete is None
            if p.seed is not None or not p.do_sample:  # the masks of other rows never reach it
                assert out.token_ids == engine.generate(prompt, p)[0].token_ids
            continue
        assert_matches(next(k for k, c in CONSTRAINTS.items() if c == p.structured_outputs), out)
        checked += 1
    return checked


def test_hundreds_of_constrained_samples_all_match(engine) -> None:
    preempted = count_preemptions(engine)
    rng = random.Random(0)
    # Greedy batches are cheap on a CPU; the sampler's sort over the vocabulary is what costs (CI: ~200 samples).
    checked = sum(check_batch(engine, *mixed_batch(rng, list(CONSTRAINTS), 64, sampled=False)) for _ in range(3))
    checked += check_batch(engine, *mixed_batch(rng, list(CONSTRAINTS), 32, sampled=True))
    assert checked >= 160
    assert preempted, "the pool was meant to run short"


@pytest.mark.structured_exhaustive
def test_thousands_of_constrained_samples_all_match(engine) -> None:
    per_kind = int(os.environ.get("HAYABUSA_STRUCTURED_SAMPLES", "1000"))
    rng = random.Random(1)
    for kind in CONSTRAINTS:
        checked = 0
        while checked < per_kind:
            checked += check_batch(engine, *mixed_batch(rng, [kind], 64, sampled=rng.random() < 0.5))


def test_n_best_of_and_beams_keep_to_the_constraint(engine) -> None:
    for kind, constraint in CONSTRAINTS.items():
        base = dict(max_new_tokens=MAX_NEW_TOKENS[kind], structured_outputs=constraint)
        outs = engine.generate(["東京", "大阪"], SamplingParams(do_sample=True, seed=4, num_return_sequences=3, **base))
        outs += engine.generate("東京", SamplingParams(do_sample=True, seed=5, best_of=3, num_return_sequences=2,
                                                      **base))
        beams = engine.generate("東京", SamplingParams(num_beams=3, num_return_sequences=2, **base))
        assert beams[0].score >= beams[1].score
        for out in outs + beams:
            assert_matches(kind, out)


def test_same_constraint_compiles_once(engine) -> None:
    compiles = engine.paged.grammars.num_compiles
    engine.generate(["a", "b"], max_new_tokens=20, structured_outputs={"regex": "[0-9]{4}"})
    engine.generate("c", max_new_tokens=20, structured_outputs=StructuredOutputs(regex="[0-9]{4}"))
    assert engine.paged.grammars.num_compiles == compiles + 1
    engine.generate("c", max_new_tokens=20, structured_outputs={"regex": "[0-9]{5}"})
    assert engine.paged.grammars.num_compiles == compiles + 2


def test_a_constraint_max_new_tokens_cuts_short_finishes_with_length_and_says_so(engine) -> None:
    out = engine.generate("東京", max_new_tokens=5, structured_outputs=CONSTRAINTS["json"])[0]
    assert out.finish_reason == "length" and out.structured_output_complete is False
    assert out.text.startswith("{") and len(out.token_ids) == 5
    # A regex that may end or go on: a whole match where max_new_tokens runs out is complete.
    out = engine.generate("東京", max_new_tokens=3, structured_outputs={"regex": "[0-9]+"})[0]
    assert out.finish_reason == "length" and out.structured_output_complete is True and out.text.isdigit()


def test_options_that_leave_no_token_allowed_fail_the_request_alone(engine) -> None:
    # After "a" the grammar allows only eos, which min_new_tokens forbids.
    cornered = SamplingParams(max_new_tokens=10, min_new_tokens=5, structured_outputs={"choice": ["a"]})
    failed, fine = engine.generate(["東京", "東京"], [cornered, SamplingParams(max_new_tokens=4)])
    assert failed.finish_reason == "error" and "no token satisfies structured_outputs" in failed.error
    assert failed.text == "a" and failed.structured_output_complete is False
    assert fine.finish_reason == "length" and fine.error is None


def test_logprobs_of_a_constrained_request_are_the_raw_logits(engine) -> None:
    out = engine.generate("東京", max_new_tokens=10, logprobs=2, structured_outputs={"choice": ["はい", "いいえ"]})[0]
    scored = engine.score("東京", [out.token_ids])[0]
    assert [entry.logprob for entry in out.logprobs] == pytest.approx(scored.token_logprobs[:len(out.logprobs)],
                                                                      abs=1e-4)


def test_the_reference_loop_refuses_structured_outputs(engine) -> None:
    from hayabusa.engine.oracle.reference_generate import reference_outputs

    with pytest.raises(ValueError, match="structured_outputs run on the paged engine"):
        reference_outputs(engine.reference, engine.tokenizer, [[1, 2]],
                          [SamplingParams(max_new_tokens=2, structured_outputs={"regex": "a"})])


def test_a_few_constrained_samples_on_the_triton_backend() -> None:
    """The kernels' op set under Triton's interpreter (slow: the small model, whose 101 ids are the vocabulary's first,
    kana pieces; its eos is id 100) masks the same way, greedy and sampled."""
    engine = PagedEngine(*small_model(), TOKENIZER, device="cpu", ops="triton", kv_cache_blocks=32, block_size=4)
    regex, choices = "(日本|です|ます){2,3}", ["日本です", "それでも", "これ"]
    params = [SamplingParams(max_new_tokens=8, structured_outputs={"regex": regex}),
              SamplingParams(max_new_tokens=8, structured_outputs={"choice": choices}, do_sample=True, seed=2),
              SamplingParams(max_new_tokens=3)]
    outs = engine.generate([[5, 6], [7], [8, 9, 10]], params)
    assert outs[0].finish_reason == "stop" and re.fullmatch(regex, outs[0].text), outs[0].text
    assert outs[1].finish_reason == "stop" and outs[1].text in choices, outs[1].text
    assert outs[2].structured_output_complete is None and len(outs[2].token_ids) == 3
