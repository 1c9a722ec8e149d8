"""Scheduler without a model: FIFO admission, token budget, preemption of the newest, recompute, errors.

A fake "model" picks each next token as a pure function of the sequence's tokens so far, so a sequence that
is preempted and recomputed must end with exactly the tokens of an unconstrained run.
"""

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.outputs import OutputBuilder
from hayabusa.engine.sampling import SamplingParams
from hayabusa.engine.scheduler import Scheduler
from hayabusa.engine.sequence import Sequence, SequenceStatus
from hayabusa.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_pretrained()


def make_seq(seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Sequence(seq_id, prompt, params, OutputBuilder(TOKENIZER, prompt, params, eos_token_id=None))


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 10


def make_scheduler(num_blocks: int, block_size: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   max_model_len: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[tuple[list[Sequence], bool]]:
    """Drive the scheduler with the fake model; check per-step invariants; return the batches."""
    batches = []
    manager = scheduler.block_manager
    for _ in range(max_steps):
        if not scheduler.has_work():
            return batches
        seqs, is_prefill = scheduler.schedule()
        assert seqs, "work is left but nothing was scheduled"
        assert len(seqs) <= scheduler.max_num_seqs
        if is_prefill:
            assert sum(len(s) - s.num_cached_tokens for s in seqs) <= scheduler.max_num_batched_tokens
        for seq in seqs:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) == manager.blocks_needed(len(seq))  # room for every token to compute
        held = [b for seq in scheduler.running for b in seq.block_table]
        assert manager.num_free_blocks + len(set(held)) == manager.num_blocks
        batches.append((list(seqs), is_prefill))
        scheduler.postprocess(seqs, [next_token(seq.token_ids) for seq in seqs])
    raise AssertionError(f"not finished after {max_steps} steps")


def expected_completion(prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def test_prefill_admits_oldest_first_within_the_token_budget() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=20, max_model_len=20)
    seqs = [make_seq(i, [1] * n, 4) for i, n in enumerate([8, 8, 5, 1])]
    for seq in seqs:
        scheduler.add(seq)
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == seqs[:2]  # 8 + 8 + 5 > 20; the last (1) would fit but waits its turn
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == seqs[2:]  # the queue drains before any decode step
    batch, is_prefill = scheduler.schedule()
    assert not is_prefill and batch == seqs


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(i, [5, 6], 3))
    batch, _ = scheduler.schedule()
    assert [s.seq_id for s in batch] == [0, 1] and len(scheduler.waiting) == 1


def test_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    # 4 blocks of 2 tokens: both sequences fit at first, then decoding runs out of blocks.
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    old, new = make_seq(0, [1, 2, 3], 4), make_seq(1, [4, 5, 6], 4)
    scheduler.add(old)
    scheduler.add(new)
    batches = run_to_completion(scheduler)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0  # the oldest always keeps its blocks
    recompute = [seqs for seqs, is_prefill in batches[1:] if is_prefill]
    assert recompute and all(seqs == [new] for seqs in recompute)
    for seq in (old, new):
        assert seq.is_finished
        assert seq.output.result().token_ids == expected_completion(seq.token_ids[:3], 4)
    assert scheduler.block_manager.num_free_blocks == 4


def test_recompute_reuses_its_own_cached_prefix() -> None:
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    old = make_seq(0, [1, 2, 3], 3)
    scheduler.add(old)
    batch, _ = scheduler.schedule()
    scheduler.postprocess(batch, [next_token(s.token_ids) for s in batch])
    scheduler.preempt(old)  # as the decode step would; its two full blocks stay published
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == [old] and old.num_cached_tokens == 2  # block [1, 2] is hit


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(0, 3)), min_size=1, max_size=12),
    num_blocks=st.integers(6, 20),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 6),
)
def test_every_request_finishes_with_its_unconstrained_tokens(requests, num_blocks, block_size,
                                                              max_num_seqs) -> None:
    scheduler = make_scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=24,
                               max_model_len=24)
    seqs = []
    for i, (prompt_len, max_new, family) in enumerate(requests):
        prompt = [family + 1] * 4 + list(range(prompt_len))  # shared prefixes within a family
        try:
            scheduler.check_fits(len(prompt), max_new)
        except ValueError:
            continue
        seqs.append(make_seq(i, prompt, max_new))
        scheduler.add(seqs[-1])
    run_to_completion(scheduler)
    for seq in seqs:
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        assert seq.output.result().token_ids == expected_completion(prompt, seq.params.max_new_tokens)
    manager = scheduler.block_manager
    assert manager.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in manager.blocks)


def test_requests_that_can_never_run_are_refused_alone() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=32, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="the prompt is empty"):
        scheduler.add(make_seq(0, [], 4))
    with pytest.raises(ValueError, match=r"30 prompt tokens \+ max_new_tokens 3 = 33 exceed the context length 32"):
        scheduler.add(make_seq(1, [1] * 30, 3))
    with pytest.raises(ValueError, match="need 5 KV blocks of 4 tokens; the pool holds only 4"):
        scheduler.add(make_seq(2, [1] * 14, 4))  # 14 + 4 - 1 = 17 cached tokens > 16 slots
    fits = make_seq(3, [1] * 14, 3)  # 16 cached tokens: exactly the pool
    scheduler.add(fits)
    run_to_completion(scheduler)
    assert fits.output.result().finish_reason == "length"


def test_abort_frees_blocks_of_a_running_sequence() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2)
    seq = make_seq(0, [1, 2, 3, 4, 5], 8)
    scheduler.add(seq)
    scheduler.schedule()
    assert scheduler.block_manager.num_free_blocks == 5
    scheduler.abort(seq)
    assert scheduler.block_manager.num_free_blocks == 8 and not scheduler.has_work()


def test_budget_smaller_than_the_context_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) must be >= max_model_len \(32\)"):
        make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=16, max_model_len=32)
