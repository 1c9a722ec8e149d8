"""Every request of a random batch gets what it gets alone, whatever shares its steps.

Each trial draws a batch mixing every decoding feature (greedy, seeded sampling with processors, several completions,
beams, prompt-lookup speculation, logprobs and prompt logprobs, max_new_tokens 0) and an engine with a random token
budget (chunked prompts), slot count and KV pool (preemption); each output must equal that request's output on a
roomy engine of its own. This is how two interaction bugs were found: idle rows advancing their sampling state in
decode steps, and logprobs lost in steps that checked another request's drafts. CI runs a few trials;
`-m property_exhaustive` (HAYABUSA_MIXED_TRIALS, default 200) runs many.
"""

import os
import random
from dataclasses import replace

import pytest

from hayabusa.engine.sampling_params import SamplingParams

from paged_engine import make_engine, small_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return small_model()


def random_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randint(1, 99) for _ in range(rng.randint(1, 20))]
    params = SamplingParams(max_new_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5)
    kind = rng.choice(["greedy", "sampled", "processed", "completions", "beams", "speculation", "logprobs"])
    if kind == "sampled":
        params = replace(params, do_sample=True, temperature=0.8, top_k=rng.choice([0, 10]), seed=rng.randint(0, 99),
                         repetition_penalty=rng.choice([1.0, 1.3]))
    elif kind == "processed":
        params = replace(params, do_sample=rng.random() < 0.5, seed=3, min_new_tokens=rng.randint(0, 4),
                         no_repeat_ngram_size=rng.choice([0, 2]), bad_words_ids=rng.choice([(), ((5,),), ((7, 8),)]))
    elif kind == "completions":
        params = replace(params, do_sample=True, seed=rng.randint(0, 99), num_return_sequences=rng.randint(2, 3))
    elif kind == "beams":
        num_beams = rng.randint(2, 4)
        params = replace(params, num_beams=num_beams, num_return_sequences=rng.randint(1, num_beams),
                         length_penalty=rng.choice([0.0, 1.0, 2.0]), early_stopping=rng.choice([True, False, "never"]),
                         repetition_penalty=rng.choice([1.0, 1.3]), no_repeat_ngram_size=rng.choice([0, 2]))
    elif kind == "speculation":
        params = replace(params, prompt_lookup_num_tokens=rng.randint(1, 5))
    elif kind == "logprobs":
        params = replace(params, logprobs=rng.randint(0, 3), prompt_logprobs=rng.choice([None, 1]),
                         max_new_tokens=rng.randint(0, 8))
    return prompt, params


def summary(output) -> tuple[tuple, list[float]]:
    """(what must be equal: tokens, ending, logprob token ids and which positions have one; what may differ by batched
    float sums: beam score, logprobs)."""
    logprobs = output.logprobs or []
    prompt_logprobs = [e for e in output.prompt_logprobs or [] if e is not None]
    exact = (output.token_ids, output.finish_reason, output.score is None, [e.token_id for e in logprobs],
             None if output.prompt_logprobs is None else [e is None for e in output.prompt_logprobs])
    floats = ([] if output.score is None else [output.score]) + [e.logprob for e in logprobs + prompt_logprobs]
    return exact, floats


def run_trial(model, seed: int) -> None:
    config, state_dict = model
    rng = random.Random(seed)
    prompts, params = zip(*(random_request(rng) for _ in range(rng.randint(2, 6))), strict=True)
    engine = make_engine(config, state_dict, kv_cache_blocks=rng.choice([24, 40, 64]),
                         max_num_seqs=rng.choice([4, 8, 16]), max_num_batched_tokens=rng.choice([3, 7, 16, 512]))
    together = [summary(out) for out in engine.generate(list(prompts), list(params))]
    alone = [summary(out) for prompt, p in zip(prompts, params, strict=True)
             for out in make_engine(config, state_dict).generate([prompt], [p])]
    assert [exact for exact, _ in together] == [exact for exact, _ in alone], (seed, prompts, params)
    for (_, got), (_, want) in zip(together, alone, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (seed, prompts, params)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("seed", range(40))
def test_a_random_mixed_batch_equals_each_request_alone(model, seed: int) -> None:
    run_trial(model, seed)


@pytest.mark.property_exhaustive
def test_many_random_mixed_batches(model) -> None:
    for seed in range(1000, 1000 + int(os.environ.get("HAYABUSA_MIXED_TRIALS", "200"))):
        run_trial(model, seed)
