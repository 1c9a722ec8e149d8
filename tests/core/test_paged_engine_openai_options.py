"""OpenAI's logit_bias, frequency_penalty, presence_penalty and best_of on the paged engine: logit_bias equal to
transformers' generate(sequence_bias=...) where that is deterministic (greedy), the device sampler equal to the
reference loop's list-based one (same seeded draws) through batching, slot moves and preemption, the penalties
counting generated tokens only, and best_of returning the best candidates by summed logprob."""

from dataclasses import replace

import pytest
import torch

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sample.seeds import completion_seed
from hayabusa.engine.sampling_params import SamplingParams

from devices import DEVICE
from hf_oracle import random_hf_model
from paged_engine import TOKENIZER, make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5, 17, 9, 3, 5, 17], [40, 41, 42], [7, 7, 7, 8], [30, 2, 33, 30, 2]]
SAMPLED = dict(do_sample=True, temperature=1.2, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    """(transformers model, config, state_dict) of a random model, vocabulary 101 (eos 100), 128 positions."""
    return random_hf_model(8, tied=False)


@pytest.fixture(scope="module")
def engine(model):
    _, config, state_dict = model
    return make_engine(config, state_dict)


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, **options) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **options)[0, len(prompt):]
    tokens = out.tolist()
    return tokens[: tokens.index(hf.config.eos_token_id) + 1] if hf.config.eos_token_id in tokens else tokens


def test_greedy_logit_bias_equals_transformers_sequence_bias(model, engine) -> None:
    hf, _, _ = model
    biases = [{13: 1.5, 40: -100.0}, {2: 0.8, 7: 1.2, 55: 2.0}, {}]
    extras = [{}, {"repetition_penalty": 1.4}, {"no_repeat_ngram_size": 2}]  # after the bias, as in transformers
    cases = [(bias, extra) for bias in biases for extra in extras]
    params = [SamplingParams(max_new_tokens=12, logit_bias=bias, **extra) for bias, extra in cases for _ in PROMPTS]
    outputs = engine.generate(PROMPTS * len(cases), params)  # every case in one batch
    for i, (prompt, out) in enumerate(zip(PROMPTS * len(cases), outputs, strict=True)):
        bias, extra = cases[i // len(PROMPTS)]
        sequence_bias = {"sequence_bias": [[[token], value] for token, value in bias.items()]} if bias else {}
        assert out.token_ids == hf_greedy(hf, prompt, 12, **sequence_bias, **extra), (prompt, bias, extra)
    unbiased = [out.token_ids for out in outputs[-len(extras) * len(PROMPTS):]]
    assert [out.token_ids for out in outputs[:len(unbiased)]] != unbiased  # the biases change outputs


def test_a_large_logit_bias_always_emits_its_token(engine) -> None:
    outputs = engine.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=10, logit_bias={33: 100.0}, ignore_eos=True),
                                            SamplingParams(max_new_tokens=10, logit_bias={33: 100.0}, **SAMPLED)])
    assert [out.token_ids for out in outputs] == [[33] * 10] * 2
    banned = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=10, logit_bias={33: -100.0}, **SAMPLED)])[0]
    assert 33 not in banned.token_ids


def test_a_large_frequency_penalty_never_repeats_a_generated_token(engine) -> None:
    plain = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=24, ignore_eos=True)] * len(PROMPTS))
    assert all(len(set(out.token_ids)) < len(out.token_ids) for out in plain)  # greedy alone repeats itself
    penalized = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=24, ignore_eos=True, frequency_penalty=2.0)]
                                * len(PROMPTS))
    for out in penalized:
        assert len(set(out.token_ids)) == len(out.token_ids), out.token_ids


def test_presence_penalty_counts_generated_tokens_not_the_prompt(engine) -> None:
    first = engine.generate([PROMPTS[2]], [SamplingParams(max_new_tokens=1)])[0].token_ids[0]
    prompt = PROMPTS[2] + [first, first]  # the greedy first token, twice more in the prompt
    plain, present, prompt_counted = engine.generate([prompt] * 3, [
        SamplingParams(max_new_tokens=16, ignore_eos=True), SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                                           presence_penalty=2.0),
        SamplingParams(max_new_tokens=16, ignore_eos=True, logit_bias={first: -2.0})])
    assert plain.token_ids[0] == present.token_ids[0] == first  # the prompt's copies of it are not counted
    assert prompt_counted.token_ids[0] != first  # what counting them would have done
    assert present.token_ids != plain.token_ids and len(set(present.token_ids)) == 16


def test_options_through_slot_moves_and_preemption_equal_the_reference_loop(model) -> None:
    """The device sampler (history counted per step, biases loaded per row, rows moved and recomputed) against the
    reference loop's list-based sampler, with the same seeded draws."""
    _, config, state_dict = model
    params = [SamplingParams(max_new_tokens=14, frequency_penalty=1.5, logit_bias={3: 2.0, 50: -3.0}, **SAMPLED),
              SamplingParams(max_new_tokens=3, presence_penalty=1.0),  # finishes first: the others move slots
              SamplingParams(max_new_tokens=14, presence_penalty=-1.0, top_k=8, min_p=0.05, **SAMPLED),
              SamplingParams(max_new_tokens=12, frequency_penalty=0.7, presence_penalty=0.7, ignore_eos=True,
                             repetition_penalty=1.2, no_repeat_ngram_size=3),
              SamplingParams(max_new_tokens=14, logit_bias={17: 3.0, 5: -2.0}, **SAMPLED),
              SamplingParams(max_new_tokens=14, top_p=0.9, **SAMPLED)]  # no OpenAI option: rides along unchanged
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2], PROMPTS[0] * 2, PROMPTS[1]]
    expected = reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts, params)
    engine = make_engine(config, state_dict, kv_cache_blocks=14)  # too few blocks: preemption and recompute
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.seq_id), preempt(seq))
    outputs = engine.generate(prompts, params)
    assert preempted
    assert [out.token_ids for out in outputs] == [out.token_ids for out in expected]
    plain = reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompts,
                              [replace(p, frequency_penalty=0, presence_penalty=0, logit_bias={}) for p in params])
    assert [a.token_ids != b.token_ids for a, b in zip(plain, expected, strict=True)] == [True, False, True, True,
                                                                                          True, False]  # they act


def test_options_on_the_triton_backend(model) -> None:
    """The kernels' engine runs the same processors (the interpreter on a CPU: one short request)."""
    _, config, state_dict = model
    params = SamplingParams(max_new_tokens=6, logit_bias={13: 1.5}, frequency_penalty=2.0, ignore_eos=True)
    engine = PagedEngine(config, {name: tensor.to(DEVICE) for name, tensor in state_dict.items()}, TOKENIZER,
                         device=DEVICE, ops="triton", kv_cache_blocks=16, block_size=4)
    out = engine.generate([PROMPTS[0]], [params])[0]
    assert out.token_ids == reference_outputs(ReferenceModel(config, state_dict), TOKENIZER, [PROMPTS[0]],
                                              [params])[0].token_ids


def test_best_of_returns_the_n_best_candidates_by_summed_logprob(engine) -> None:
    params = SamplingParams(max_new_tokens=8, best_of=5, num_return_sequences=2, logprobs=1, **SAMPLED)
    best = engine.generate([PROMPTS[1]], [params])
    # Candidate j is a one-completion request seeded completion_seed(seed, j).
    candidates = engine.generate([PROMPTS[1]] * 5, [replace(params, best_of=None, num_return_sequences=1,
                                                            seed=completion_seed(params.seed, j)) for j in range(5)])
    scores = [sum(entry.logprob for entry in out.logprobs) for out in candidates]
    ranked = sorted(range(5), key=lambda j: -scores[j])
    assert [out.token_ids for out in best] == [candidates[j].token_ids for j in ranked[:2]]
    assert len({tuple(out.token_ids) for out in candidates}) == 5 and ranked[:2] != [0, 1]  # a real choice
    for out, j in zip(best, ranked, strict=False):
        assert out.cumulative_logprob == pytest.approx(scores[j], abs=1e-4)
        assert out.cumulative_logprob == pytest.approx(sum(entry.logprob for entry in out.logprobs), abs=1e-4)
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    without_logprobs = engine.generate([PROMPTS[1]], [replace(params, logprobs=None)])
    assert [(out.token_ids, out.logprobs) for out in without_logprobs] == [(out.token_ids, None) for out in best]


def test_best_of_with_greedy_decoding_runs_only_the_n_returned(engine) -> None:
    paged = engine
    request_id = paged.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6, best_of=4, num_return_sequences=2))
    assert len(paged._requests[request_id]) == 2  # greedy candidates would all be the same
    finished = []
    while paged.has_unfinished_requests():
        finished += [update.finished for update in paged.step() if update.finished is not None]
    plain = paged.generate([PROMPTS[2]], [SamplingParams(max_new_tokens=6)])[0]
    assert [out.token_ids for out in finished] == [plain.token_ids] * 2


def test_best_of_hands_out_the_best_whole_once_every_candidate_ended(engine) -> None:
    params = SamplingParams(max_new_tokens=6, best_of=3, num_return_sequences=2, logprobs=0, **SAMPLED)
    request_id = engine.add_request(PROMPTS[0], params)
    other = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=4))
    updates = []
    while engine.has_unfinished_requests():
        updates += [update for update in engine.step() if update.request_id == request_id]
    assert [update.index for update in updates] == [0, 1] and all(u.finished is not None for u in updates)
    for update in updates:
        assert update.new_token_ids == update.finished.token_ids and update.text_delta == update.finished.text
        assert [entry.token_id for entry in update.new_logprobs] == update.finished.token_ids
    assert updates[0].finished.cumulative_logprob >= updates[1].finished.cumulative_logprob
    assert [update.finished.token_ids for update in updates] == \
        [out.token_ids for out in engine.generate([PROMPTS[0]], [params])]
    assert other not in engine._requests
    with pytest.raises(ValueError, match="best_of 3 does not stream"):
        engine.stream(PROMPTS[0], replace(params, num_return_sequences=1))


def test_an_aborted_best_of_request_ends_with_n_aborted_outputs(engine) -> None:
    request_id = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30, best_of=4, num_return_sequences=3,
                                                               **SAMPLED))
    assert engine.step() == [] and engine.step() == []  # candidates running: nothing handed out yet
    engine.abort(request_id)
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    updates += engine.step()
    assert sorted(update.index for update in updates) == [0, 1, 2]
    assert {update.finished.finish_reason for update in updates} == {"abort"}
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
