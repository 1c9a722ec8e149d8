"""Scheduler without a model: FIFO admission, token budget, preemption of the newest, recompute, errors, and the
one-step lag of the engine's read-back.

A fake "model" picks each next token as a pure function of the sequence's tokens so far, so a sequence that
is preempted and recomputed must end with exactly the tokens of an unconstrained run. The fake device samples a
row's token from the tokens the host knows plus the one still in flight, as the real device does; with `lagged`
the driver plans step N before reading back step N-1, as PagedEngine does.
"""

from collections import defaultdict, deque

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from hayabusa.engine.core.block_manager import BlockManager
from hayabusa.engine.core.output_processor import OutputProcessor
from hayabusa.engine.core.request_checks import check_capacity, check_request
from hayabusa.engine.core.scheduler import Scheduler
from hayabusa.engine.core.sequence import Sequence, SequenceStatus
from hayabusa.engine.core.step_plan import StepPlan
from hayabusa.engine.outputs import OutputBuilder
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.worker.model_runner import StepResult
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


class FakeDevice:
    """Samples next_token for each row that has a token to compute, from the tokens the host knows plus those still
    in flight (sampled by a launched step whose results are not read back yet)."""

    def __init__(self) -> None:
        self.in_flight: dict[Sequence, deque[int]] = defaultdict(deque)

    def run(self, plan: StepPlan) -> list[int]:
        tokens = []
        for seq, count in zip(plan.seqs, plan.tokens_per_row.tolist(), strict=True):
            if not count:
                tokens.append(-1)  # a row with nothing to compute: its output must never be used
                continue
            tokens.append(next_token(seq.token_ids + list(self.in_flight[seq])))
            self.in_flight[seq].append(tokens[-1])
        return tokens

    def read_back(self, scheduler: Scheduler, plan: StepPlan, tokens: list[int]) -> None:
        for seq, count in zip(plan.seqs, plan.tokens_per_row.tolist(), strict=True):
            if count:
                self.in_flight[seq].popleft()
        read_back(scheduler, plan, tokens)


def read_back(scheduler: Scheduler, plan: StepPlan, tokens: list[int]) -> None:
    """What the engine does with a step's sampled ids: the output processor applies them to the sequences, then the
    scheduler frees what ended and publishes the blocks they filled."""
    outputs = OutputProcessor(scheduler.block_manager.block_size).process(plan, StepResult(tokens, frozenset(), None))
    scheduler.update_from_outputs(plan, outputs)


def check_plan(scheduler: Scheduler, plan: StepPlan) -> None:
    manager, slots = scheduler.block_manager, scheduler.slots
    assert plan.num_rows == slots.count == len(scheduler.running) <= scheduler.max_num_seqs
    for row, seq in enumerate(plan.seqs):
        assert seq.status is SequenceStatus.RUNNING and seq.slot == row
    num_new_tokens = plan.num_new_tokens if plan.is_mixed else (plan.positions >= 0).astype(int)
    if plan.is_mixed and scheduler.chunked_prefill:
        assert 0 < num_new_tokens.sum() <= max(scheduler.max_num_batched_tokens, len(plan.seqs))
    for row, (seq, position, count, samples) in enumerate(zip(plan.seqs, plan.positions.tolist(), num_new_tokens,
                                                              plan.tokens_per_row.tolist(), strict=True)):
        assert (position >= 0) == bool(count)
        if row in plan.chunks:  # a prompt chunk: known tokens, its blocks all allocated; it samples at the end
            assert position + count <= len(seq) <= len(seq.block_table) * manager.block_size
            assert samples == (position + count == len(seq))
        elif row in plan.forked_from:  # a fork child starting with its parent's last chunk: its blocks, its logits
            parent = plan.seqs[plan.forked_from[row]]
            assert count == 0 and samples == plan.tokens_per_row[parent.slot]
            assert seq.block_table == parent.block_table and seq.request_id == parent.request_id
        elif count:  # a decode row: one token, in a block it holds, never past max_new_tokens
            assert count == 1 and samples
            assert position < len(seq.block_table) * manager.block_size
            # The last sampled token is never written to the cache.
            assert position <= seq.num_prompt_tokens + seq.params.max_new_tokens - 2
        else:
            assert not samples
    held = [b for seq in scheduler.running for b in seq.block_table]
    assert manager.num_free_blocks + len(set(held)) == manager.num_blocks


def run_to_completion(scheduler: Scheduler, lagged: bool = False,
                      max_steps: int = 10_000) -> list[tuple[list[Sequence], list[Sequence]]]:
    """Drive the scheduler with the fake model; check per-step invariants; return each launched step's (sampling
    sequences, sequences with a prompt chunk)."""
    batches = []
    device = FakeDevice()
    in_flight: tuple[StepPlan, list[int]] | None = None
    for _ in range(max_steps):
        if not scheduler.has_work() and in_flight is None:
            return batches
        plan = scheduler.schedule(results_in_flight=in_flight is not None)
        if plan is None:  # blocks are short: the engine reads the step in flight back first
            device.read_back(scheduler, *in_flight)
            in_flight, plan = None, scheduler.schedule()
        check_plan(scheduler, plan)
        launched = None
        if plan.has_work:
            batches.append(([s for s, n in zip(plan.seqs, plan.tokens_per_row, strict=True) if n],
                            [plan.seqs[row] for row in plan.chunks]))
            launched = (plan, device.run(plan))
            if plan.chunks:
                scheduler.publish_prefilled(plan)  # as the engine does once a step is launched
        previous, in_flight = (in_flight, launched) if lagged else (launched, None)
        assert previous is not None or plan.has_work or in_flight is not None, "work is left but nothing ran"
        if previous is not None:
            device.read_back(scheduler, *previous)
    raise AssertionError(f"not finished after {max_steps} steps")


def expected_completion(prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def test_prompt_chunks_fill_the_budget_beside_the_decodes() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=20, max_model_len=20)
    seqs = [make_seq(i, [1] * n, 4) for i, n in enumerate([8, 8, 5, 1])]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()  # 8 + 8 + the first 4 of 5: the budget is full; the last waits its turn (FIFO)
    assert plan.seqs == seqs[:3] and plan.chunks == [0, 1, 2] and plan.admitted == [0, 1, 2]
    assert plan.num_new_tokens.tolist() == [8, 8, 4] and plan.positions.tolist() == [0, 0, 0]
    assert plan.tokens_per_row.tolist() == [1, 1, 0]  # the cut prompt samples nothing yet
    plan = scheduler.schedule()  # two decode rows, the cut prompt's last token, and the 1-token prompt joins
    assert plan.seqs == seqs and plan.chunks == [2, 3] and plan.admitted == [3]
    assert plan.num_new_tokens.tolist() == [1, 1, 1, 1] and plan.positions.tolist() == [8, 8, 4, 0]
    assert plan.tokens_per_row.tolist() == [1, 1, 1, 1]
    plan = scheduler.schedule()
    assert not plan.is_mixed and plan.seqs == seqs  # slot order
    assert plan.positions.tolist() == [9, 9, 5, 1]  # each writes the token its last step sampled (in flight)


def test_without_chunked_prefill_whole_prompts_run_in_steps_of_their_own() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=20, max_model_len=20,
                          chunked_prefill=False)
    seqs = [make_seq(i, [1] * n, 4) for i, n in enumerate([8, 8, 5, 1])]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.chunks == [0, 1] and plan.num_new_tokens.tolist() == [8, 8]  # 8 + 8 + 5 > 20: the 5 waits
    plan = scheduler.schedule()  # the queue drains first; the decode rows wait
    assert plan.chunks == [2, 3] and plan.num_new_tokens.tolist() == [0, 0, 5, 1]
    assert plan.tokens_per_row.tolist() == [0, 0, 1, 1] and plan.positions.tolist() == [-1, -1, 0, 0]
    plan = scheduler.schedule()
    assert not plan.is_mixed and plan.positions.tolist() == [8, 8, 5, 1]


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(i, [5, 6], 3))
    plan = scheduler.schedule()
    assert [s.seq_id for s in plan.seqs] == [0, 1] and len(scheduler.waiting) == 1


@pytest.mark.parametrize("lagged", [False, True])
def test_out_of_blocks_preempts_the_newest_and_recomputes_it(lagged: bool) -> None:
    # 4 blocks of 2 tokens: both sequences fit at first, then decoding runs out of blocks.
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    old, new = make_seq(0, [1, 2, 3], 4), make_seq(1, [4, 5, 6], 4)
    scheduler.add(old)
    scheduler.add(new)
    batches = run_to_completion(scheduler, lagged)
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
    plan = scheduler.schedule()
    scheduler.publish_prefilled(plan)
    read_back(scheduler, plan, [next_token(s.token_ids) for s in plan.seqs])
    scheduler.preempt(old)  # as the decode step would; its two full blocks stay published
    plan = scheduler.schedule()
    assert plan.chunks == [0] and plan.seqs == [old] and old.num_cached_tokens == 2  # block [1, 2] is hit
    assert plan.positions.tolist() == [2] and plan.num_new_tokens.tolist() == [2]


def test_a_sequence_with_a_token_in_flight_is_never_preempted() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2)
    seq = make_seq(0, [1, 2, 3], 5)
    scheduler.add(seq)
    scheduler.schedule()  # its prefill's token is now in flight
    with pytest.raises(RuntimeError, match="has a sampled token in flight"):
        scheduler.preempt(seq)


def test_blocks_short_with_tokens_in_flight_asks_for_them_first() -> None:
    # 4 blocks of 2: two prompts of 4 tokens take them all; writing their sampled tokens (position 4) needs more.
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    a, b = make_seq(0, [1, 2, 3, 4], 3), make_seq(1, [4, 5, 6, 7], 3)
    scheduler.add(a)
    scheduler.add(b)
    prefill = scheduler.schedule()
    assert scheduler.block_manager.num_free_blocks == 0
    assert scheduler.schedule(results_in_flight=True) is None
    read_back(scheduler, prefill, [7, 8])
    plan = scheduler.schedule()  # every token known: the newest gives way
    assert [s.seq_id for s in plan.seqs] == [0] and b.num_preemptions == 1 and scheduler.waiting[0] is b


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(0, 3), st.integers(1, 3)),
                      min_size=1, max_size=12),
    num_blocks=st.integers(6, 20),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 6),
    budget=st.sampled_from([1, 3, 7, 24, None]),  # None: without chunked prefill
)
@pytest.mark.parametrize("lagged", [False, True])
def test_every_request_finishes_with_its_unconstrained_tokens(lagged, requests, num_blocks, block_size,
                                                              max_num_seqs, budget) -> None:
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget or 24, max_model_len=24, chunked_prefill=budget is not None)
    seqs = []
    for i, (prompt_len, max_new, family, num_completions) in enumerate(requests):
        prompt = [family + 1] * 4 + list(range(prompt_len))  # shared prefixes within a family
        try:  # what the engine checks where a request enters (the scheduler trusts it)
            params = SamplingParams(max_new_tokens=max_new, num_return_sequences=num_completions)
            check_request(prompt, params, vocab_size=1 << 20, max_model_len=24)
            check_capacity(len(prompt), params, max_num_seqs=max_num_seqs, num_blocks=num_blocks,
                           block_size=block_size)
        except ValueError:
            continue
        seq = make_seq(i, prompt, max_new)
        # More completions of the prompt: forked at admission, sharing its blocks (the fake model is deterministic,
        # so each must end with the same tokens, whatever copies, preemptions and recomputes it went through).
        seq.fork_children = [seq.fork(100 * (i + 1) + j, seed=j, index=j) for j in range(1, num_completions)]
        scheduler.add(seq)
        seqs += [seq, *seq.fork_children]
    run_to_completion(scheduler, lagged)
    for seq in seqs:
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        assert seq.output.result().token_ids == expected_completion(prompt, seq.params.max_new_tokens)
    manager = scheduler.block_manager
    assert manager.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in manager.blocks)


def test_a_request_that_exactly_fits_the_pool_runs() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=32, max_num_batched_tokens=32)
    fits = make_seq(3, [1] * 14, 3)  # 16 cached tokens: exactly the pool (request_checks refuses one more)
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


def test_budget_smaller_than_the_context_is_rejected_without_chunked_prefill() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) must be >= max_model_len \(32\) without"):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32,
                  chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=0)
