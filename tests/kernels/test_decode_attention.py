"""Paged decode attention: Triton kernel vs its torch reference, cache writes, split-K, padding rows, bad arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from hayabusa.kernels.decode_attention import decode_attention, decode_attention_ref, pick_num_splits
from hayabusa.kernels.rotary import apply_rotary_ref, rotary_tables

from devices import DEVICE, FULL_SHAPES, ON_GPU
from tolerance import GuardRegistry, assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_HEADS = 32 if FULL_SHAPES else 2
HEAD_DIM = 80
ROTARY_BASE = 10000.0


@dataclass
class DecodeInputs:
    qkv: torch.Tensor  # [B, 3 * H * D]
    positions: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq]
    k_cache: torch.Tensor  # [num_blocks, block_size, H, D]; slots no sequence holds are NaN
    v_cache: torch.Tensor
    cos: torch.Tensor  # float32 [max_positions, rotary_dims // 2]
    sin: torch.Tensor
    rotary_dims: int

    def args(self, guards: GuardRegistry) -> tuple:
        """Arguments of one call: qkv and caches copied inside guard bands, so each call writes its own caches."""
        return (guards.copy_of(self.qkv, "qkv"), self.positions, self.block_tables,
                guards.copy_of(self.k_cache, "k_cache"), guards.copy_of(self.v_cache, "v_cache"),
                self.cos, self.sin, self.rotary_dims)


def make_inputs(positions: list[int], *, block_size: int, dtype: torch.dtype, num_heads: int = NUM_HEADS,
                head_dim: int = HEAD_DIM, rotary_dims: int = HEAD_DIM, seed: int = 0) -> DecodeInputs:
    """Random qkv and cached keys 0..p-1 per sequence, on pages at random, non-contiguous block ids."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [p // block_size + 1 if p >= 0 else 0 for p in positions]
    max_blocks_per_seq = max(pages_per_seq) + 1  # a spare column that no sequence needs
    num_blocks = sum(pages_per_seq) + 7  # some blocks nobody owns
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(positions), max_blocks_per_seq), -1, dtype=torch.int32)
    k_cache = poisoned((num_blocks, block_size, num_heads, head_dim), dtype, "cpu")
    v_cache = poisoned((num_blocks, block_size, num_heads, head_dim), dtype, "cpu")
    cached_slots = []  # flat slot ids of tokens 0..p-1 of every sequence: already in the cache
    for seq, (position, num_pages) in enumerate(zip(positions, pages_per_seq, strict=True)):
        block_tables[seq, :num_pages] = torch.tensor(block_ids[:num_pages], dtype=torch.int32)
        block_ids = block_ids[num_pages:]
        tokens = torch.arange(max(position, 0))
        cached_slots.append(block_tables[seq, tokens // block_size].long() * block_size + tokens % block_size)
    cached_slots = torch.cat(cached_slots)
    for cache in (k_cache, v_cache):
        cache.view(-1, num_heads, head_dim)[cached_slots] = torch.randn(
            len(cached_slots), num_heads, head_dim, generator=gen).to(dtype)
    qkv = torch.randn(len(positions), 3 * num_heads * head_dim, generator=gen).to(dtype)
    cos, sin = rotary_tables(rotary_dims, max(positions) + 5, ROTARY_BASE, DEVICE)
    return DecodeInputs(qkv.to(DEVICE), torch.tensor(positions, dtype=torch.int32, device=DEVICE),
                        block_tables.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), cos, sin, rotary_dims)


def written_slots(inputs: DecodeInputs) -> torch.Tensor:
    """bool [num_blocks, block_size]: the slots of the real rows' new tokens."""
    num_blocks, block_size = inputs.k_cache.shape[:2]
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for seq, position in enumerate(inputs.positions.tolist()):
        if position >= 0:
            written[int(inputs.block_tables[seq, position // block_size]), position % block_size] = True
    return written


def check_cache_writes(inputs: DecodeInputs, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The new token's slot holds its rotated k and its v; every other slot is exactly as before (NaN included)."""
    dtype = inputs.qkv.dtype
    batch, (_, block_size, num_heads, head_dim) = inputs.qkv.shape[0], inputs.k_cache.shape
    q_k_v = inputs.qkv.view(batch, num_heads, 3, head_dim)
    for seq, position in enumerate(inputs.positions.tolist()):
        if position < 0:
            continue
        page, offset = int(inputs.block_tables[seq, position // block_size]), position % block_size
        rotated_k = apply_rotary_ref(q_k_v[seq, :, 1], inputs.cos[position], inputs.sin[position])
        assert_close(k_cache[page, offset], rotated_k, dtype, name=f"k_cache slot of sequence {seq}")
        assert_close(v_cache[page, offset], q_k_v[seq, :, 2], dtype, rel_tol=0.0, name=f"v_cache of seq {seq}")
    untouched = ~written_slots(inputs).to(k_cache.device)
    for name, after, before in (("k_cache", k_cache, inputs.k_cache), ("v_cache", v_cache, inputs.v_cache)):
        torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: a slot other than the new tokens' changed\n{m}")


def run_and_compare(inputs: DecodeInputs, num_splits: int | None, guards: GuardRegistry) -> torch.Tensor:
    """Kernel vs reference: output and cache writes, every guard band intact. Returns the kernel's output.

    The output and the split partials come from torch.empty, which the kernel tests guard (conftest)."""
    dtype = inputs.qkv.dtype
    expected = decode_attention_ref(*inputs.args(guards))
    args = inputs.args(guards)
    out = decode_attention(*args, num_splits=num_splits)
    guards.check()
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    check_cache_writes(inputs, args[3], args[4])
    return out


def boundary_positions(block_size: int) -> list[int]:
    """Position 0, a context filling its pages exactly, one opening a new page, contexts ending mid-page."""
    if FULL_SHAPES:
        gen = torch.Generator().manual_seed(block_size)
        return [0, block_size - 1, block_size, 2047, 1023] + torch.randint(0, 2048, (27,), generator=gen).tolist()
    return [0, block_size - 1, block_size, 2 * block_size + 5, 4 * block_size - 1]


@pytest.mark.parametrize("rotary_dims", [HEAD_DIM, 20], ids=["full_rotary", "partial_rotary"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, block_size, rotary_dims, guards):
    inputs = make_inputs(boundary_positions(block_size), block_size=block_size, dtype=dtype, rotary_dims=rotary_dims)
    run_and_compare(inputs, num_splits=None, guards=guards)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_k_matches_single_pass(num_splits, dtype, guards):
    # 5 splits of a 3-token context leave splits with nothing to do; 130 tokens span several tiles per split
    positions = [1300, 3, 130, 47] if FULL_SHAPES else [3, 130, 47]
    inputs = make_inputs(positions, block_size=16, dtype=dtype, rotary_dims=40, seed=1)
    single_pass = run_and_compare(inputs, num_splits=1, guards=guards)
    split = run_and_compare(inputs, num_splits=num_splits, guards=guards)
    assert_close(split, single_pass, dtype)


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's bf16 casts; a GPU rounds them natively")
def test_interpreted_bf16_rotated_k_rounds_to_nearest(guards):
    """The rotated k is rounded to bf16 (ties to even) under the interpreter too, so its cache slot holds exactly
    the reference's bits (a truncating cast differs in about 1% of the elements)."""
    inputs = make_inputs([0, 15, 16, 37, 63], block_size=16, dtype=torch.bfloat16, seed=6)
    kernel_args, ref_args = inputs.args(guards), inputs.args(guards)
    decode_attention(*kernel_args)
    decode_attention_ref(*ref_args)
    written = written_slots(inputs)
    assert torch.equal(kernel_args[3][written].view(torch.int16), ref_args[3][written].view(torch.int16))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_rows_write_nothing_and_output_zero(num_splits, guards):
    inputs = make_inputs([-1, 21, -1, 0, 9], block_size=16, dtype=torch.float16, seed=2)
    out = run_and_compare(inputs, num_splits=num_splits, guards=guards)  # also checks that padding rows wrote no slot
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))


# Narrow heads (1, 2, 5, 8 = issue 10's hidden 64 / 8 heads, 15) and odd widths pad BLOCK_D past head_dim.
@pytest.mark.parametrize("head_dim, rotary_dims", [(64, 64), (36, 12), (256, 64), (32, 0), (1, 0), (2, 2), (5, 4),
                                                   (8, 2), (15, 14), (17, 16)])
def test_other_head_dims(head_dim, rotary_dims, guards):
    inputs = make_inputs([0, 17, 40], block_size=16, dtype=torch.float32, num_heads=3, head_dim=head_dim,
                         rotary_dims=rotary_dims, seed=3)
    run_and_compare(inputs, num_splits=None, guards=guards)
    run_and_compare(inputs, num_splits=2, guards=guards)


@pytest.mark.parametrize("rotary_dims", [HEAD_DIM, 20], ids=["full_rotary", "partial_rotary"])
def test_decode_after_reference_fill_matches_whole_sequence_attention(rotary_dims, guards):
    """Fill the cache one token at a time with the reference, decode the last token with the kernel, and compare
    every step with plain causal attention over the whole (unpaged) sequence."""
    seq_len, block_size, dtype = (300 if FULL_SHAPES else 40), 16, torch.float32
    inputs = make_inputs([seq_len - 1], block_size=block_size, dtype=dtype, rotary_dims=rotary_dims, seed=4)
    k_cache = guards.new(inputs.k_cache.shape, dtype, DEVICE, "k_cache")
    v_cache = guards.new(inputs.v_cache.shape, dtype, DEVICE, "v_cache")
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(seq_len, NUM_HEADS, 3, HEAD_DIM, generator=gen).to(DEVICE)  # the whole sequence's tokens

    # Whole-sequence causal attention: [T, H, D]
    positions = torch.arange(seq_len, device=DEVICE)
    q = apply_rotary_ref(qkv[:, :, 0], inputs.cos[positions][:, None], inputs.sin[positions][:, None])
    k = apply_rotary_ref(qkv[:, :, 1], inputs.cos[positions][:, None], inputs.sin[positions][:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=DEVICE).tril()
    whole = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), qkv[:, :, 2])

    for position in range(seq_len):
        step = replace(inputs, qkv=qkv[position].reshape(1, -1),
                       positions=torch.tensor([position], dtype=torch.int32, device=DEVICE))
        op = decode_attention if position == seq_len - 1 else decode_attention_ref
        out = op(step.qkv, step.positions, step.block_tables, k_cache, v_cache, step.cos, step.sin, rotary_dims)
        guards.check()
        assert_close(out.view(NUM_HEADS, HEAD_DIM), whole[position], dtype, name=f"{op.__name__} at {position}")


def test_num_splits_heuristic():
    assert pick_num_splits(batch=32, num_heads=32, max_context=2048, num_sms=132) == 1  # enough programs
    assert pick_num_splits(batch=1, num_heads=32, max_context=2048, num_sms=132) == 16  # few programs, long context
    assert pick_num_splits(batch=8, num_heads=32, max_context=2048, num_sms=132) == 2  # 3 rounded down to 2^k
    assert pick_num_splits(batch=2, num_heads=32, max_context=2048, num_sms=132) == 8  # 9 rounded down
    assert pick_num_splits(batch=1, num_heads=32, max_context=256, num_sms=132) == 2  # short context: few splits
    assert pick_num_splits(batch=1, num_heads=32, max_context=64, num_sms=132) == 1


def _set(field: str, make):
    return lambda inputs: replace(inputs, **{field: make(inputs)})


BAD_ARGUMENTS = {
    "qkv int dtype": (_set("qkv", lambda i: i.qkv.to(torch.int32)), "qkv has dtype"),
    "k_cache dtype differs": (_set("k_cache", lambda i: i.k_cache.float()), "k_cache has dtype"),
    "qkv non-contiguous": (_set("qkv", lambda i: i.qkv.t().contiguous().t()), "qkv must be contiguous"),
    "qkv width": (_set("qkv", lambda i: i.qkv[:, :-3].contiguous()), "qkv has .* columns"),
    "v_cache shape": (_set("v_cache", lambda i: i.v_cache[:-1].contiguous()), "v_cache has shape"),
    "head_dim > 256": (lambda i: replace(i, k_cache=i.k_cache.new_zeros(4, 16, 1, 264),
                                         v_cache=i.v_cache.new_zeros(4, 16, 1, 264)), "head_dim 264"),
    "positions float": (_set("positions", lambda i: i.positions.float()), "positions has dtype"),
    "positions length": (_set("positions", lambda i: i.positions[:1].contiguous()), "positions has 1 entries"),
    "block_tables int64": (_set("block_tables", lambda i: i.block_tables.long()), "block_tables has dtype"),
    "rotary_dims odd": (_set("rotary_dims", lambda i: 19), "rotary_dims"),
    "rotary_dims > head_dim": (_set("rotary_dims", lambda i: 82), "rotary_dims"),
    "cos width": (_set("cos", lambda i: i.cos[:, :-1].contiguous()), "cos .* and sin .* must both be"),
    "sin float64": (_set("sin", lambda i: i.sin.double()), "sin has dtype"),
    "position beyond rotary table": (lambda i: replace(i, cos=i.cos[:30].contiguous(), sin=i.sin[:30].contiguous()),
                                     "rotary tables"),
    "position beyond block table": (_set("block_tables", lambda i: i.block_tables[:, :1].contiguous()),
                                    "block_tables capacity"),
    "needed block id >= num_blocks": (_set("block_tables", lambda i: i.block_tables.where(
        i.block_tables != i.block_tables[1, 1], i.k_cache.shape[0])), r"block_tables\[1, 1\]"),
    "needed block id < 0": (_set("block_tables", lambda i: i.block_tables.where(
        i.block_tables != i.block_tables[1, 0], -1)), r"block_tables\[1, 0\]"),
}


@pytest.mark.parametrize("op", [decode_attention, decode_attention_ref], ids=lambda op: op.__name__)
@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=str)
def test_bad_arguments_raise_before_launch(case, op):
    inputs = make_inputs([5, 30], block_size=16, dtype=torch.float16, head_dim=HEAD_DIM)
    mutate, message = BAD_ARGUMENTS[case]
    bad = mutate(inputs)
    k_cache, v_cache = bad.k_cache.clone(), bad.v_cache.clone()
    with pytest.raises(ValueError, match=message):
        op(bad.qkv, bad.positions, bad.block_tables, k_cache, v_cache, bad.cos, bad.sin, bad.rotary_dims)
    if k_cache.shape == bad.k_cache.shape:  # nothing was written before the error
        torch.testing.assert_close(k_cache, bad.k_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", [decode_attention, decode_attention_ref], ids=lambda op: op.__name__)
def test_check_indices_false_gives_the_same_result(op, monkeypatch, guards):
    """Indices valid by construction: check_indices=False writes and returns the same, and reads nothing back."""
    import hayabusa.kernels._attention_checks as checks

    calls = []
    check = checks._check_decode_indices
    monkeypatch.setattr(checks, "_check_decode_indices", lambda *args: calls.append(1) or check(*args))
    inputs = make_inputs([5, 30, -1], block_size=16, dtype=torch.float16)  # the last row is padding
    checked_args, trusted_args = inputs.args(guards), inputs.args(guards)
    checked = op(*checked_args)
    assert len(calls) == 1
    trusted = op(*trusted_args, check_indices=False)
    assert len(calls) == 1
    for name, a, b in (("out", trusted, checked), ("k_cache", trusted_args[3], checked_args[3]),
                       ("v_cache", trusted_args[4], checked_args[4])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs")


@pytest.mark.parametrize("num_splits", [0, 17, 2.0])
def test_bad_num_splits(num_splits, guards):
    inputs = make_inputs([5], block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(*inputs.args(guards), num_splits=num_splits)


def test_unused_block_table_entries_are_not_checked(guards):
    inputs = make_inputs([5, 30], block_size=16, dtype=torch.float32)
    garbage = inputs.block_tables.clone()
    garbage[0, 1:] = 10**6  # sequence 0 needs only its first page
    run_and_compare(replace(inputs, block_tables=garbage), num_splits=None, guards=guards)


@pytest.mark.skipif(ON_GPU, reason="CPU tensors are only refused on a machine where the interpreter is off")
def test_cpu_without_interpreter_is_refused(monkeypatch, guards):
    inputs = make_inputs([5], block_size=16, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        decode_attention(*inputs.args(guards))
