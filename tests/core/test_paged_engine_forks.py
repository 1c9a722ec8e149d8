"""Forks on the real runner (torch op set, CPU): the n completions of one prompt share its KV blocks, copy the block
they write next, and sample with their own seeds.
"""

from dataclasses import replace

import pytest

from hayabusa.engine.sample.seeds import completion_seed
from hayabusa.engine.sampling_params import SamplingParams

from paged_engine import SAMPLED, blocks_in_use_per_plan, make_engine, small_model

PROMPT = [5, 17, 9, 3, 77, 1]  # 6 tokens: blocks of 4 leave the second block half full
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return small_model()


LONG_PROMPT = [5, 17, 9, 3, 77, 1, 2, 3, 4, 5]  # blocks of 4: two full blocks and a half-full third


# Budget 3: the 10-token prompt runs in 4 chunks while the other 3 completions wait, forked, for its last one.
@pytest.mark.parametrize("budget", [None, 3], ids=["whole-prompt", "chunked"])
@pytest.mark.parametrize("kv_cache_blocks", [64, 8], ids=["roomy", "preempting"])
def test_n_completions_share_the_prompt_and_equal_independent_seeded_runs(model, kv_cache_blocks, budget) -> None:
    config, state_dict = model
    n_params = replace(SAMPLED, num_return_sequences=4)
    independent = make_engine(config, state_dict).generate(
        [LONG_PROMPT] * 4, [replace(SAMPLED, seed=completion_seed(SAMPLED.seed, j)) for j in range(4)])
    assert completion_seed(SAMPLED.seed, 0) == SAMPLED.seed  # completion 0 is the request's n=1 output
    engine = make_engine(config, state_dict, kv_cache_blocks=kv_cache_blocks, max_num_batched_tokens=budget)
    usage = blocks_in_use_per_plan(engine)
    preempted = []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.index), preempt(seq))
    outputs = engine.generate([LONG_PROMPT], [n_params])
    assert [out.token_ids for out in outputs] == [out.token_ids for out in independent]
    assert [out.text for out in outputs] == [out.text for out in independent]
    assert len({tuple(out.token_ids) for out in outputs}) == 4
    assert usage[0] == 3  # the prefill: the prompt's blocks, once for all four
    if kv_cache_blocks == 64:
        # 2 shared full blocks + per completion the third block (3 copied on write) and two more for its tokens,
        # instead of 4 x 5 for four separate requests.
        assert not preempted and max(usage) == 2 + 4 * 3
    else:
        assert preempted and 0 not in preempted  # the newest completions gave way and were recomputed alone
    assert engine.block_manager.num_free_blocks == kv_cache_blocks
    assert all(block.ref_count == 0 for block in engine.block_manager.blocks)


def test_rows_idle_in_a_decode_step_keep_their_sampling_state(model) -> None:
    """Budget 3: the 3 completions of the first request decode with the whole budget while the second request's
    prompt has run only 2 of its 3 tokens, so a decode step samples over its idle row. Its noise step, seen tokens
    (penalty) and history (n-grams) must not move: it equals its run alone."""
    config, state_dict = model
    first = replace(SAMPLED, max_new_tokens=2, num_return_sequences=3, seed=31)
    second = replace(SAMPLED, max_new_tokens=6, seed=51, no_repeat_ngram_size=2)
    prompts = [LONG_PROMPT, [75, 94, 74]]
    (alone,) = make_engine(config, state_dict).generate(prompts[1:], [second])
    engine = make_engine(config, state_dict, max_num_batched_tokens=3)
    decode_steps_with_idle_rows = []
    schedule = engine.scheduler.schedule

    def spying_schedule(results_in_flight=False):
        plan = schedule(results_in_flight)
        if plan is not None and plan.has_work and not plan.is_mixed:
            decode_steps_with_idle_rows.append(bool((plan.positions < 0).any()))
        return plan

    engine.scheduler.schedule = spying_schedule
    outputs = engine.generate(prompts, [first, second])
    assert any(decode_steps_with_idle_rows)
    assert outputs[3].token_ids == alone.token_ids


def test_greedy_completions_are_copies_and_outputs_come_per_prompt_in_order(model) -> None:
    config, state_dict = model
    engine = make_engine(config, state_dict)
    single = engine.generate([LONG_PROMPT, PROMPT], [GREEDY, GREEDY])
    outputs = engine.generate([LONG_PROMPT, PROMPT, PROMPT], [replace(GREEDY, num_return_sequences=3), GREEDY,
                                                              replace(GREEDY, num_return_sequences=2)])
    assert [out.token_ids for out in outputs] == [single[0].token_ids] * 3 + [single[1].token_ids] * 3


def test_updates_name_each_completion_and_abort_ends_them_all(model) -> None:
    config, state_dict = model
    engine = make_engine(config, state_dict)
    params = replace(SAMPLED, max_new_tokens=20, num_return_sequences=3)
    request = engine.add_request(LONG_PROMPT, params)
    updates = engine.step() + engine.step() + engine.step()
    assert {u.request_id for u in updates} == {request} and {u.index for u in updates} == {0, 1, 2}
    engine.abort(request)
    updates += engine.step()  # the abort's final updates come with the next step
    finished = {u.index: u.finished for u in updates if u.finished is not None}
    assert sorted(finished) == [0, 1, 2] and {out.finish_reason for out in finished.values()} == {"abort"}
    for index, out in finished.items():
        assert sum((u.new_token_ids for u in updates if u.index == index), []) == out.token_ids
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_bad_completion_counts_are_refused(model) -> None:
    config, state_dict = model
    engine = make_engine(config, state_dict, max_num_seqs=2)
    with pytest.raises(ValueError, match=r"num_return_sequences 3 is more than the 2 sequences .* \(max_num_seqs\)"):
        engine.add_request(PROMPT, replace(GREEDY, num_return_sequences=3))
    outputs = engine.generate([PROMPT, PROMPT], [replace(GREEDY, num_return_sequences=3), GREEDY])
    assert [out.finish_reason for out in outputs] == ["error"] * 3 + ["length"]
    with pytest.raises(ValueError, match="stream.. yields the text of one completion"):
        engine.stream(PROMPT, replace(GREEDY, num_return_sequences=2))
