"""Beam search in the paged engine (engine.decoding.paged_beams): the same beams, order and scores as the reference
loop's beams, which tests/decoding/test_beam_search.py checks against transformers' generate(num_beams); beams sharing
KV blocks, with chunked prompts, beside other requests, under preemption, and through the serving loop."""

import math
from dataclasses import replace

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.oracle.reference_beams import reference_beam_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams

from hf_oracle import random_hf_model
from paged_engine import TOKENIZER, blocks_in_use_per_plan, make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = 100  # random_hf_model's eos id with vocab 101
PROMPT = [5, 17, 42, 8, 9, 3, 77]  # blocks of 4: one full block and a partly filled one


@pytest.fixture(scope="module")
def model():
    """(config, state_dict) of a random model whose eos logit is large enough that beams end at different steps."""
    hf, config, _ = random_hf_model(0, tied=False)
    with torch.no_grad():
        hf.gpt_neox_japanese.final_layer_norm.bias[0] = 3.0
        hf.embed_out.weight[EOS] = 0.0
        hf.embed_out.weight[EOS, 0] = 0.7
    return config, {name: tensor.detach().clone() for name, tensor in hf.state_dict().items()}


def expected(model, prompt, params):
    config, state_dict = model
    return reference_beam_outputs(ReferenceModel(config, state_dict), TOKENIZER, prompt, params)


def assert_same(ours, theirs) -> None:
    assert [(out.token_ids, out.finish_reason) for out in ours] == [(out.token_ids, out.finish_reason)
                                                                    for out in theirs]
    assert [out.text for out in ours] == [out.text for out in theirs]
    for out, want in zip(ours, theirs, strict=True):
        assert math.isclose(out.score, want.score, rel_tol=1e-5, abs_tol=1e-6), (out.score, want.score)


def assert_engine_beams_equal_the_reference(model, params: SamplingParams) -> None:
    engine = make_engine(*model)
    assert_same(engine.generate([PROMPT], [params]), expected(model, PROMPT, params))
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and all(b.ref_count == 0 for b in manager.blocks)


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "n", "penalty"), [
    (2, 1.0, False, 2, 1.0), (4, 1.0, False, 4, 1.0), (4, 2.0, "never", 3, 1.0), (4, -1.0, True, 1, 1.0),
    (3, 0.0, False, 3, 1.5)])
def test_paged_beams_equal_the_reference_beams(model, num_beams, length_penalty, early_stopping, n, penalty) -> None:
    assert_engine_beams_equal_the_reference(model, SamplingParams(
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=n,
        max_new_tokens=10, repetition_penalty=penalty))


@pytest.mark.parametrize("options", [{"no_repeat_ngram_size": 1}, {"bad_words_ids": [[49], [13, 74]]},
                                     {"min_new_tokens": 8, "eos_token_id": [EOS, 13]},
                                     {"logit_bias": {13: 1.0, 49: -2.0}, "frequency_penalty": 1.0,
                                      "presence_penalty": 0.5}])
def test_paged_beams_with_logits_processors(model, options) -> None:
    assert_engine_beams_equal_the_reference(model, SamplingParams(num_beams=3, num_return_sequences=3,
                                                                  max_new_tokens=10, **options))


def test_beams_share_the_prompt_and_grow_with_divergence(model) -> None:
    """A 30-token prompt (7 full blocks of 4 and 2 tokens) under 4 beams of 12 tokens: the prompt's full blocks are
    held once; each beam holds only its own tail (at most 4 blocks), never a copy of the prompt."""
    prompt = list(range(3, 33))
    params = SamplingParams(num_beams=4, num_return_sequences=4, max_new_tokens=12, ignore_eos=True)
    engine = make_engine(*model)
    usage = blocks_in_use_per_plan(engine)
    assert_same(engine.generate([prompt], [params]), expected(model, prompt, params))
    assert usage[0] == 8  # admission: the prompt's blocks, once for the four beams
    assert max(usage) <= 7 + 4 * 4 < 4 * 11  # 4 separate sequences would hold 11 blocks each


@pytest.mark.parametrize("budget", [3, 512], ids=["chunked", "whole-prompts"])
def test_beams_run_beside_other_requests_and_chunked_prompts(model, budget) -> None:
    beams = SamplingParams(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, seed=5, num_return_sequences=2,
                             ignore_eos=True)
    prompts = [PROMPT, [9, 8, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48], PROMPT[:5]]
    params = [beams, greedy, replace(beams, num_beams=2, num_return_sequences=1), sampled]
    alone = [make_engine(*model).generate([prompt], [p]) for prompt, p in zip(prompts, params, strict=True)]
    outputs = make_engine(*model, max_num_batched_tokens=budget).generate(prompts, params)
    assert [len(out) for out in alone] == [2, 1, 1, 2]
    assert_same(outputs[:2], expected(model, prompts[0], beams))
    assert_same(outputs[3:4], expected(model, prompts[2], params[2]))
    assert [out.token_ids for out in outputs] == [out.token_ids for outs in alone for out in outs]


def test_a_preempted_beam_group_restarts_and_gives_the_same_beams(model) -> None:
    params = SamplingParams(num_beams=3, num_return_sequences=3, max_new_tokens=12, ignore_eos=True)
    engine = make_engine(*model, kv_cache_blocks=13)  # one group fits however its beams diverge (1 + 3 x 4), two do not
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.request_id), preempt(seq))
    outputs = engine.generate([PROMPT, PROMPT[::-1]], [params, params])
    assert preempted
    assert_same(outputs[:3], expected(model, PROMPT, params))
    assert_same(outputs[3:], expected(model, PROMPT[::-1], params))
    assert engine.block_manager.num_free_blocks == 13


def test_beam_updates_come_at_the_end_best_first_and_abort_ends_the_group(model) -> None:
    params = SamplingParams(num_beams=3, num_return_sequences=2, max_new_tokens=6)
    engine = make_engine(*model)
    request = engine.add_request(PROMPT, params)
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    assert [(u.index, u.request_id) for u in updates] == [(0, request), (1, request)]
    for update, want in zip(updates, expected(model, PROMPT, params), strict=True):
        assert update.new_token_ids == update.finished.token_ids == want.token_ids
        assert update.text_delta == want.text and update.finished.score == pytest.approx(want.score, rel=1e-5)
    aborted = engine.add_request(PROMPT, params)
    engine.step()
    engine.step()
    engine.abort(aborted)
    finished = engine.step()
    assert [u.finished.finish_reason for u in finished] == ["abort", "abort"]
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_groups_that_cannot_fit_are_refused(model) -> None:
    engine = make_engine(*model, kv_cache_blocks=12, max_num_seqs=4)
    with pytest.raises(ValueError, match=r"num_beams 4 with 7 prompt tokens \+ max_new_tokens 20 need up to 25 KV"):
        engine.add_request(PROMPT, SamplingParams(num_beams=4, max_new_tokens=20))
    with pytest.raises(ValueError, match=r"num_beams 5 is more than the 4 sequences"):
        engine.add_request(PROMPT, SamplingParams(num_beams=5, max_new_tokens=2))


@pytest.mark.filterwarnings("ignore::hayabusa.engine.platform.devices.InterpreterWarning")  # a tiny model, a few tokens
def test_beams_on_the_triton_backend(model) -> None:
    config, state_dict = model
    params = SamplingParams(num_beams=2, num_return_sequences=2, max_new_tokens=3)
    engine = Engine(config, state_dict, TOKENIZER, backend="triton", device="cpu", kv_cache_blocks=32, block_size=4)
    assert_same(engine.generate([PROMPT], params), expected(model, PROMPT, params))
