"""The paged engine's step-level surface the server drives: RequestUpdate per step, abort by id, stats."""

import threading

import pytest

from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

from hf_oracle import random_hf_model

TOKENIZER = Tokenizer.from_pretrained()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    _, config, state_dict = random_hf_model(43, hidden=160, heads=2, layers=2, max_positions=64)
    return config, state_dict


def make_engine(model, **kwargs) -> PagedEngine:
    config, state_dict = model
    return PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", **kwargs)


def run_to_end(engine: PagedEngine) -> list:
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    return updates


def test_updates_carry_each_token_and_join_to_the_generated_output(model) -> None:
    prompts = [[5, 17, 99, 3], [77, 1], [9, 30, 31, 32, 60]]
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=3, stop=("の",)),
              SamplingParams(max_new_tokens=5, do_sample=True, seed=3, temperature=0.9)]
    expected = make_engine(model, kv_cache_blocks=32, block_size=4).generate(prompts, params)
    engine = make_engine(model, kv_cache_blocks=32, block_size=4)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    updates = run_to_end(engine)
    for request_id, want in zip(ids, expected, strict=True):
        mine = [u for u in updates if u.request_id == request_id]
        assert [t for u in mine for t in u.new_token_ids] == want.token_ids
        assert "".join(u.text_delta for u in mine) == want.text
        assert [u.finished is not None for u in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finished.token_ids == want.token_ids and mine[-1].finished.finish_reason == want.finish_reason
    assert engine.stats().num_free_blocks == engine.stats().num_blocks == 32


def test_abort_from_another_thread_frees_blocks_and_ends_with_an_abort_update(model) -> None:
    engine = make_engine(model, kv_cache_blocks=16, block_size=4)
    running = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=30, ignore_eos=True))
    waiting = engine.add_request([6, 7], SamplingParams(max_new_tokens=4))
    before = engine.step() + engine.step()  # both prefilled; the tokens read back so far are in these updates
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 0) and stats.num_free_blocks < 16
    aborter = threading.Thread(target=engine.abort, args=(running,))
    aborter.start()
    aborter.join()
    engine.abort(12345)  # unknown ids are ignored
    updates = run_to_end(engine)
    last = [u for u in updates if u.request_id == running]
    assert len(last) == 1 and last[0].new_token_ids == [] and last[0].text_delta == ""
    assert last[0].finished.finish_reason == "abort" and last[0].finished.error == "aborted"
    delivered = [t for u in before if u.request_id == running for t in u.new_token_ids]
    assert delivered and last[0].finished.token_ids == delivered  # what it had produced before the abort
    assert [u.finished.finish_reason for u in updates if u.request_id == waiting and u.finished] == ["length"]
    engine.abort(running)  # already finished: ignored
    assert engine.step() == []
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, 16)


def test_abort_of_a_waiting_request_and_a_request_that_finished_meanwhile(model) -> None:
    engine = make_engine(model, kv_cache_blocks=16, block_size=4)
    short = engine.add_request([1, 2], SamplingParams(max_new_tokens=1))
    queued = engine.add_request([3, 4], SamplingParams(max_new_tokens=4))
    assert engine.stats().num_waiting == 2
    engine.abort(queued)  # never prefilled
    updates = run_to_end(engine)  # the abort applies first, then short runs its one token and finishes
    assert [(u.request_id, u.finished.finish_reason) for u in updates] == [(queued, "abort"), (short, "length")]
    engine.abort(short)  # finished in the step before: ignored
    assert not engine.has_unfinished_requests() and engine.stats().num_free_blocks == 16
