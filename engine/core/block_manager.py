"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts and prefix caching.

Only integers live here (block ids, token ids); the KV tensors themselves belong to the model runner. A
sequence's token at position p lives in block `block_table[p // block_size]`, slot `p % block_size`.

Prefix caching: once every token of a full block has been computed, the block is published under a hash
chained over all blocks before it (so equal hashes mean equal prefixes). A later sequence whose prompt starts
with the same full blocks takes them by reference instead of recomputing them. Freed blocks keep their
contents and hash until they are handed out again, so a preempted or finished prompt can still be hit.
Release never copies: dropping the last reference puts the block back on the free list.

Forks (n completions of one prompt, beams): `fork` gives a child every block of its parent by reference. Only a
block that is not full can still be written, and whoever writes into a block that others hold first takes a
private copy (`copy_on_write`, or `may_append` at a decode step); the model runner copies the KV of the block.
So a fork costs blocks only where its children diverge.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class PagedSequence(Protocol):
    """What the block manager reads and writes on a sequence (engine.core.sequence.Sequence satisfies it)."""

    token_ids: list[int]
    block_table: list[int]
    num_cached_tokens: int


@dataclass
class PagedPrompt:
    """A bare PagedSequence: token ids and the blocks that hold them (`hayabusa verify` and the runner's warm-up
    pack prompts this way without a request behind them)."""

    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


def chained_block_hash(token_ids: list[int], prefix_hash: bytes) -> bytes:
    """128-bit hash of one full block's tokens together with the hash of every block before it."""
    digest = hashlib.blake2b(prefix_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class Block:
    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full and computed; kept while the block is free
        self.token_ids: list[int] = []  # the tokens behind `hash`, compared on a hit to rule out collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # least recently freed first
        self.hash_to_block_id: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prompt (prefill) allocation -------------------------------------------------------------------------

    def _cache_hits(self, token_ids: list[int], max_cached_tokens: int | None = None) -> list[int]:
        """Block ids of the leading full blocks already computed for this exact prefix, within its first
        max_cached_tokens tokens.

        By default the last token is never taken from the cache: its logits are needed, so at least one token is
        always computed (a prompt that is an exact multiple of block_size still recomputes its last block). A
        sequence that needs logits from an earlier position on (prompt logprobs) passes a smaller limit.
        """
        if max_cached_tokens is None:
            max_cached_tokens = len(token_ids) - 1
        hits: list[int] = []
        prefix_hash = b""
        for i in range(max_cached_tokens // self.block_size):
            block_tokens = token_ids[i * self.block_size:(i + 1) * self.block_size]
            prefix_hash = chained_block_hash(block_tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != block_tokens:
                break
            hits.append(block_id)
        return hits

    def _fits(self, num_tokens: int, hits: list[int]) -> bool:
        """Whether the free list covers the new blocks plus the cache hits that sit on it (revived hits)."""
        revived = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        return self.blocks_needed(num_tokens) - len(hits) + revived <= self.num_free_blocks

    def can_allocate(self, seq: PagedSequence, max_cached_tokens: int | None = None) -> bool:
        """Whether every block of seq's tokens can be had now (cache hits on free blocks still take one)."""
        return self._fits(len(seq.token_ids), self._cache_hits(seq.token_ids, max_cached_tokens))

    def allocate(self, seq: PagedSequence, max_cached_tokens: int | None = None) -> None:
        """Give seq a block table covering all its tokens; sets seq.num_cached_tokens to the prefix-cache hit (at
        most max_cached_tokens; default all but the last token)."""
        if seq.block_table:
            raise ValueError(f"sequence already holds blocks {seq.block_table}; deallocate it first")
        hits = self._cache_hits(seq.token_ids, max_cached_tokens)
        if not self._fits(len(seq.token_ids), hits):
            raise ValueError(
                f"cannot allocate {self.blocks_needed(len(seq.token_ids))} blocks: {self.num_free_blocks} free"
            )
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in
                                  range(self.blocks_needed(len(seq.token_ids)) - len(hits))]
        seq.num_cached_tokens = len(hits) * self.block_size

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} on the free list with ref_count {block.ref_count}"
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its contents are about to be overwritten
        block.hash, block.token_ids = None, []
        block.ref_count = 1
        return block_id

    def deallocate(self, seq: PagedSequence) -> None:
        """Drop seq's references; blocks nobody else holds go back on the free list, contents kept for hits."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _release(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} released more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)

    # ---- forks -----------------------------------------------------------------------------------------------

    def fork(self, parent: PagedSequence, child: PagedSequence) -> None:
        """Give child every block of parent by reference (child's tokens are parent's); no block is copied now."""
        if child.block_table:
            raise ValueError(f"the fork child already holds blocks {child.block_table}; deallocate it first")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_cached_tokens = parent.num_cached_tokens

    def reassign(self, seqs: list[PagedSequence], parents: list[PagedSequence]) -> None:
        """Give seqs[i] the block table of parents[i] by reference (beam search; parents may be among seqs and
        repeat): every parent's table is read before any is replaced; blocks nobody holds any more are freed."""
        tables = [list(parent.block_table) for parent in parents]
        for table in tables:  # every new reference before any old one goes: a block passed on is never freed
            for block_id in table:
                self.blocks[block_id].ref_count += 1
        for seq, table in zip(seqs, tables, strict=True):
            self._release(seq.block_table)
            seq.block_table = table

    def is_shared(self, seq: PagedSequence, position: int) -> bool:
        """Whether the block that holds `position` of seq is held by another sequence too."""
        return self.blocks[seq.block_table[position // self.block_size]].ref_count > 1

    def copy_on_write(self, seq: PagedSequence, position: int) -> tuple[int, int] | None:
        """Before seq writes the KV of `position` into a block it shares: give seq a private block in its place.
        Returns (source, destination) block ids, whose KV the caller must copy before the write; None when seq
        holds that block alone."""
        index = position // self.block_size
        source = seq.block_table[index]
        if self.blocks[source].ref_count == 1:
            return None
        if not self.free_block_ids:
            raise ValueError("no free block for a copy-on-write")
        destination = self._take_free_block()
        self.blocks[source].ref_count -= 1
        seq.block_table[index] = destination
        return source, destination

    # ---- decode growth ---------------------------------------------------------------------------------------

    def can_append(self, seq: PagedSequence) -> bool:
        """Whether the next decode step (which writes the last token of seq) has its slot or a free block: a new
        block, or a private copy of a shared one."""
        missing = self.blocks_needed(len(seq.token_ids)) - len(seq.block_table)
        if missing == 0 and self.is_shared(seq, len(seq.token_ids) - 1):
            missing = 1
        return missing <= self.num_free_blocks

    def may_append(self, seq: PagedSequence) -> tuple[int, int] | None:
        """Make room for the KV of seq's last token: a new block (at most one per decode step), or a private copy
        of the block it shares. Returns the block copy the runner must make first (see copy_on_write), or None."""
        if len(seq.block_table) < self.blocks_needed(len(seq.token_ids)):
            while len(seq.block_table) < self.blocks_needed(len(seq.token_ids)):
                seq.block_table.append(self._take_free_block())
            return None
        return self.copy_on_write(seq, len(seq.token_ids) - 1)

    def append_block(self, seq: PagedSequence) -> int:
        """Give seq one more block (the scheduler knows, from its in-flight token counts, that it needs one)."""
        if not self.free_block_ids:
            raise ValueError("no free block to append")
        block_id = self._take_free_block()
        seq.block_table.append(block_id)
        return block_id

    def trim(self, seq: PagedSequence, num_blocks: int) -> None:
        """Release seq's blocks past its first num_blocks (they hold only the KV of rejected draft tokens)."""
        self._release(seq.block_table[num_blocks:])
        del seq.block_table[num_blocks:]

    # ---- prefix publishing -----------------------------------------------------------------------------------

    def cache_computed_blocks(self, seq: PagedSequence, num_computed_tokens: int) -> None:
        """Publish the full blocks among seq's first num_computed_tokens tokens, whose KV is now in the cache.

        Called after a model step, never before: a block published at allocation time could be hit by another
        sequence of the same batch before its KV exists.
        """
        # Published blocks always form a prefix of the table, so only the tail past the last one needs work.
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        first = num_full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        prefix_hash = self.blocks[seq.block_table[first - 1]].hash if first else b""
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            block_tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            block.hash = chained_block_hash(block_tokens, prefix_hash)
            block.token_ids = block_tokens
            self.hash_to_block_id.setdefault(block.hash, block.block_id)
            prefix_hash = block.hash
