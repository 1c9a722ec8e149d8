"""Block manager invariants under random allocate / decode / preempt / finish sequences (hypothesis).

A shadow KV cache records, for every slot written, the whole token prefix that produced it (KV depends on
the prefix, not just the token). After every step each live sequence must read back exactly its own prefix
from every computed position: that rules out a block owned twice, a wrong prefix-cache hit and a write into
a shared block. Forked sequences share every block; the block copies `may_append` asks for are applied to the
shadow as the model runner applies them to the KV cache. Reference counts must match the block tables, and
everything is free at the end.
"""

from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hayabusa.engine.core.block_manager import BlockManager


@dataclass
class FakeSequence:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_computed: int = 0  # positions whose KV is in the cache


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.manager = BlockManager(num_blocks, block_size)
        self.shadow: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, slot) -> prefix that wrote it
        self.running: list[FakeSequence] = []
        self.preempted: list[FakeSequence] = []
        self.max_hit_tokens = 0

    def _compute(self, seq: FakeSequence, upto: int) -> None:
        """What the model does: write KV for positions num_computed..upto-1, then publish full blocks."""
        bs = self.manager.block_size
        for p in range(seq.num_computed, upto):
            block_id = seq.block_table[p // bs]
            assert self.manager.blocks[block_id].ref_count == 1, f"write into shared block {block_id}"
            self.shadow[(block_id, p % bs)] = tuple(seq.token_ids[:p + 1])
        seq.num_computed = upto
        self.manager.cache_computed_blocks(seq, upto)

    def _admit(self, seq: FakeSequence) -> bool:
        if not self.manager.can_allocate(seq):
            with pytest.raises(ValueError, match="cannot allocate"):
                self.manager.allocate(seq)
            return False
        self.manager.allocate(seq)
        assert len(seq.block_table) == self.manager.blocks_needed(len(seq.token_ids))
        assert seq.num_cached_tokens % self.manager.block_size == 0
        assert seq.num_cached_tokens < len(seq.token_ids), "the last token must always be computed"
        self.max_hit_tokens = max(self.max_hit_tokens, seq.num_cached_tokens)
        seq.num_computed = seq.num_cached_tokens  # hit positions are checked by the invariant below
        self._compute(seq, len(seq.token_ids))
        self.running.append(seq)
        return True

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def add_sequence(self, prompt: list[int]) -> None:
        self._admit(FakeSequence(list(prompt)))

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def resume_preempted(self, data: st.DataObject) -> None:
        seq = self.preempted[data.draw(st.integers(0, len(self.preempted) - 1))]
        if self._admit(seq):
            self.preempted.remove(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data: st.DataObject, token: int) -> None:
        seq = self.running[data.draw(st.integers(0, len(self.running) - 1))]
        seq.token_ids.append(token)  # sampled by the previous step, written to the cache by this one
        if not self.manager.can_append(seq):
            self._preempt(seq)
            return
        copy = self.manager.may_append(seq)
        if copy is not None:  # what the runner does before the step writes: the block's KV, slot by slot
            source, destination = copy
            for slot in range(self.manager.block_size):
                if (source, slot) in self.shadow:
                    self.shadow[(destination, slot)] = self.shadow[(source, slot)]
        assert len(seq.block_table) == self.manager.blocks_needed(len(seq.token_ids))
        self._compute(seq, len(seq.token_ids))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = self.running[data.draw(st.integers(0, len(self.running) - 1))]
        child = FakeSequence(list(parent.token_ids), num_computed=parent.num_computed)
        free_before = self.manager.num_free_blocks
        self.manager.fork(parent, child)
        assert child.block_table == parent.block_table and self.manager.num_free_blocks == free_before
        self.running.append(child)

    def _preempt(self, seq: FakeSequence) -> None:
        self.manager.deallocate(seq)
        seq.num_computed = 0
        self.running.remove(seq)
        self.preempted.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(self.running[data.draw(st.integers(0, len(self.running) - 1))])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.manager.deallocate(seq)
        assert seq.block_table == []

    @invariant()
    def every_sequence_reads_its_own_prefix(self) -> None:
        bs = self.manager.block_size
        for seq in self.running:
            for p in range(seq.num_computed):
                written = self.shadow.get((seq.block_table[p // bs], p % bs))
                assert written == tuple(seq.token_ids[:p + 1]), f"position {p} of {seq.token_ids} reads {written}"

    @invariant()
    def reference_counts_match_block_tables(self) -> None:
        manager = self.manager
        owners = [0] * manager.num_blocks
        for seq in self.running:
            assert len(set(seq.block_table)) == len(seq.block_table), f"block twice in one table {seq.block_table}"
            for block_id in seq.block_table:
                owners[block_id] += 1
        assert [block.ref_count for block in manager.blocks] == owners
        free = list(manager.free_block_ids)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert sorted(free) == [i for i, n in enumerate(owners) if n == 0]
        for key, block_id in manager.hash_to_block_id.items():
            assert manager.blocks[block_id].hash == key

    def teardown(self) -> None:
        if not hasattr(self, "manager"):
            return
        for seq in self.running:
            self.manager.deallocate(seq)
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert all(block.ref_count == 0 for block in self.manager.blocks)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase


def test_shared_prompt_prefix_reuses_blocks_by_reference() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    first = FakeSequence(list(range(10)))
    manager.allocate(first)
    manager.cache_computed_blocks(first, 10)  # two full blocks published, the third holds 2 tokens
    second = FakeSequence(list(range(8)) + [42, 43, 44])
    assert manager.can_allocate(second)
    manager.allocate(second)
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert manager.num_free_blocks == 8 - 4

    other_start = FakeSequence([99] + list(range(1, 8)) + [5])  # same second block, different first: no hit
    manager.allocate(other_start)
    assert other_start.num_cached_tokens == 0


def test_freed_blocks_stay_hittable_until_reused() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    seq = FakeSequence([1, 2, 3, 4, 5])
    manager.allocate(seq)
    manager.cache_computed_blocks(seq, 5)
    blocks = list(seq.block_table)
    manager.deallocate(seq)
    assert manager.num_free_blocks == 3
    again = FakeSequence([1, 2, 3, 4, 6])
    manager.allocate(again)  # both full blocks revived from the free list
    assert again.block_table[:2] == blocks[:2] and again.num_cached_tokens == 4
    manager.deallocate(again)
    filler = FakeSequence([7, 7, 7, 7, 7, 7])
    manager.allocate(filler)  # takes every block, overwriting the cached prefix
    manager.deallocate(filler)
    assert manager.hash_to_block_id == {}
    assert manager.can_allocate(FakeSequence([1, 2, 3, 4, 5])) and manager.can_allocate(FakeSequence([1] * 6))
    assert not manager.can_allocate(FakeSequence([1] * 7))


def test_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = FakeSequence([1, 2, 3, 4])
    manager.allocate(seq)
    manager.cache_computed_blocks(seq, 4)
    twin = FakeSequence([1, 2, 3, 4])
    manager.allocate(twin)
    assert twin.num_cached_tokens == 2  # the last token's logits are needed, so its block is computed again
    assert twin.block_table[0] == seq.block_table[0] and twin.block_table[1] != seq.block_table[1]


def test_bad_pool_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks must be a positive integer, got 0"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got -1"):
        BlockManager(4, -1)


def test_forked_children_share_blocks_until_they_write() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = FakeSequence(list(range(6)))  # one full block and a half-full one
    manager.allocate(parent)
    children = [FakeSequence(list(parent.token_ids)) for _ in range(3)]
    for child in children:
        manager.fork(parent, child)
    assert manager.num_free_blocks == 6 and [manager.blocks[b].ref_count for b in parent.block_table] == [4, 4]
    copies = []
    for seq in children + [parent]:  # each writes its own 7th token into the shared half-full block
        seq.token_ids.append(100 + len(copies))
        assert manager.can_append(seq)
        copies.append(manager.may_append(seq))
    shared_full, shared_tail = parent.block_table[0], copies[0][0]
    assert copies[:3] == [(shared_tail, child.block_table[1]) for child in children] and copies[3] is None
    assert parent.block_table == [shared_full, shared_tail]  # the last holder writes in place
    assert all(child.block_table[0] == shared_full for child in children)
    assert manager.num_free_blocks == 3 and manager.blocks[shared_full].ref_count == 4
    for seq in children + [parent]:
        manager.deallocate(seq)
    assert manager.num_free_blocks == 8 and all(block.ref_count == 0 for block in manager.blocks)


def test_copy_on_write_needs_a_free_block() -> None:
    manager = BlockManager(num_blocks=1, block_size=4)
    parent, child = FakeSequence([1, 2]), FakeSequence([1, 2])
    manager.allocate(parent)
    manager.fork(parent, child)
    child.token_ids.append(3)
    assert not manager.can_append(child)
    with pytest.raises(ValueError, match="no free block for a copy-on-write"):
        manager.may_append(child)
