"""Prefill attention kernel against its torch reference, and the reference against transformers."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
import triton

from hayabusa.kernels.prefill_attention import prefill_attention, prefill_attention_ref, split_head_dim
from hayabusa.kernels.rotary import rotary_tables

from devices import DEVICE, FULL_SHAPES, ON_GPU
from tolerance import GuardRegistry, assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POSITIONS = 4096

# (new tokens, context length after the call) per sequence. Primes, a cached prefix, contexts ending mid-page,
# a sequence with no new tokens, and one longer than a 128-query block so queries span two blocks.
SMALL_SEQS = [(37, 37), (23, 151), (0, 20), (131, 131), (5, 6)]
FULL_SEQS = [(2048, 2048)]  # the benchmark shape
FULL_PACKED_SEQS = [(1021, 1021), (509, 1500), (300, 2048), (1, 777)]


@dataclass
class Case:
    qkv: torch.Tensor  # [T, 3 * H * D]
    positions: torch.Tensor  # [T]
    cu_seqlens: torch.Tensor  # [S + 1]
    context_lens: torch.Tensor  # [S]
    block_tables: torch.Tensor  # [S, max_blocks]
    k_cache: torch.Tensor  # [num_blocks, block_size, H, D]
    v_cache: torch.Tensor
    cos: torch.Tensor  # [MAX_POSITIONS, rotary_dims // 2]
    sin: torch.Tensor
    rotary_dims: int
    new_slots: torch.Tensor  # flat cache slots the call must write

    def args(self, k_cache=None, v_cache=None) -> tuple:
        return (self.qkv, self.positions, self.cu_seqlens, self.context_lens, self.block_tables,
                self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache,
                self.cos, self.sin, self.rotary_dims)


def make_case(seqs: list[tuple[int, int]], *, num_heads: int = 2, head_dim: int = 80, rotary_dims: int = 80,
              block_size: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Random qkv; every cache slot NaN except the cached prefixes; pages at random scattered block ids."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [triton.cdiv(context, block_size) for _, context in seqs]
    num_blocks = sum(blocks_needed) + 7  # spare blocks no sequence owns
    block_ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seqs), max(blocks_needed) + 2), -1, dtype=torch.int32)  # unused entries: -1
    k_cache = poisoned((num_blocks, block_size, num_heads, head_dim), dtype, "cpu")
    v_cache = poisoned((num_blocks, block_size, num_heads, head_dim), dtype, "cpu")
    positions, new_slots, used = [], [], 0
    for seq, (num_new, context) in enumerate(seqs):
        block_tables[seq, :blocks_needed[seq]] = block_ids[used:used + blocks_needed[seq]].int()
        used += blocks_needed[seq]
        slots = block_tables[seq, torch.arange(context) // block_size].long() * block_size \
            + torch.arange(context) % block_size
        prefix = context - num_new
        for cache in (k_cache, v_cache):
            cache.view(-1, num_heads, head_dim)[slots[:prefix]] = torch.randn(
                prefix, num_heads, head_dim, generator=gen).to(dtype)
        positions.append(torch.arange(prefix, context))
        new_slots.append(slots[prefix:])
    num_tokens = sum(num_new for num_new, _ in seqs)
    cos, sin = rotary_tables(rotary_dims, MAX_POSITIONS, 10000.0, DEVICE)
    cu_seqlens = torch.tensor([0] + [num_new for num_new, _ in seqs]).cumsum(0)
    return Case(
        qkv=torch.randn(num_tokens, 3 * num_heads * head_dim, generator=gen).to(dtype).to(DEVICE),
        positions=torch.cat(positions).int().to(DEVICE),
        cu_seqlens=cu_seqlens.int().to(DEVICE),
        context_lens=torch.tensor([context for _, context in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE), k_cache=k_cache.to(DEVICE), v_cache=v_cache.to(DEVICE),
        cos=cos, sin=sin, rotary_dims=rotary_dims, new_slots=torch.cat(new_slots).to(DEVICE),
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t, so that NaN compares equal to the same NaN."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def check_against_reference(case: Case, dtype: torch.dtype, guards: GuardRegistry) -> None:
    """Output and cache writes against the reference; qkv, the caches and the output (allocated by the kernel
    through torch.empty) lie inside guard bands, checked right after the call."""
    k_kernel, v_kernel = guards.copy_of(case.k_cache, "k_cache"), guards.copy_of(case.v_cache, "v_cache")
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    out = prefill_attention(*replace(case, qkv=guards.copy_of(case.qkv, "qkv")).args(k_kernel, v_kernel))
    guards.check()
    expected = prefill_attention_ref(*case.args(k_ref, v_ref))
    assert_close(out, expected, dtype, name="out")
    num_heads, head_dim = case.k_cache.shape[2:]
    for name, before, kernel, ref in (("k_cache", case.k_cache, k_kernel, k_ref),
                                      ("v_cache", case.v_cache, v_kernel, v_ref)):
        before, kernel, ref = (c.view(-1, num_heads, head_dim) for c in (before, kernel, ref))
        assert_close(kernel[case.new_slots], ref[case.new_slots], dtype, name=f"{name} new slots")
        others = torch.ones(kernel.shape[0], dtype=torch.bool, device=kernel.device)
        others[case.new_slots] = False
        assert torch.equal(bits(kernel[others]), bits(before[others])), f"{name}: a slot outside the call changed"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, block_size, guards):
    seq_sets = [FULL_SEQS, FULL_PACKED_SEQS] if FULL_SHAPES else [SMALL_SEQS]
    num_heads = 32 if FULL_SHAPES else 2
    for seqs in seq_sets:
        check_against_reference(make_case(seqs, num_heads=num_heads, block_size=block_size, dtype=dtype), dtype,
                                guards)


@pytest.mark.parametrize("head_dim, rotary_dims, dtype", [
    (80, 40, torch.float32),  # partial rotary; head_dim split 64 + 16
    (64, 16, torch.float16),  # partial rotary; power of two, no tail
    (40, 0, torch.float32),  # no rotary; split 32 + a tail of 8 real lanes in 16
    (96, 96, torch.bfloat16),  # split 64 + 32
    (256, 128, torch.float32),  # the largest head_dim
    # Heads narrower than the 16-lane minimum dot: the main part's lanes >= head_dim are padding, never loaded or
    # stored (they belong to the next head, or lie past the output's end for the last one).
    (8, 2, torch.float32),  # issue 10: hidden 64 / 8 heads, rotary_pct 0.25
    (1, 0, torch.float32),
    (2, 2, torch.float16),
    (5, 4, torch.bfloat16),
    (15, 14, torch.float32),
    (17, 16, torch.float16),  # split 16 + a tail of 1 real lane in 16
])
def test_other_head_dims_and_partial_rotary(head_dim, rotary_dims, dtype, guards):
    seqs = [(19, 19), (13, 70)] if not FULL_SHAPES else [(700, 700), (300, 1201)]
    num_heads = (8 if FULL_SHAPES else 1) if head_dim >= 16 else 3  # narrow heads: several, side by side
    case = make_case(seqs, num_heads=num_heads, head_dim=head_dim, rotary_dims=rotary_dims, dtype=dtype,
                     seed=head_dim)
    check_against_reference(case, dtype, guards)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_equals_one_pass(dtype, guards):
    """Prefill in two chunks (the second reading the first's keys from the cache) = one prefill of it all."""
    total, first = (1500, 1000) if FULL_SHAPES else (47, 29)
    case = make_case([(total, total)], dtype=dtype, block_size=16, seed=3)
    k_cache, v_cache = guards.copy_of(case.k_cache, "k_cache"), guards.copy_of(case.v_cache, "v_cache")
    one_pass = prefill_attention(*case.args(k_cache, v_cache))

    k_chunked, v_chunked = guards.copy_of(case.k_cache, "k_cache"), guards.copy_of(case.v_cache, "v_cache")
    outputs = []
    for start, end in ((0, first), (first, total)):
        chunk = replace(case, qkv=case.qkv[start:end].contiguous(), positions=case.positions[start:end].long(),
                        cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32, device=DEVICE),
                        context_lens=torch.tensor([end], dtype=torch.int32, device=DEVICE))
        outputs.append(prefill_attention(*chunk.args(k_chunked, v_chunked)))
    guards.check()
    assert_close(torch.cat(outputs), one_pass, dtype, name="chunked out")
    assert torch.equal(bits(k_chunked), bits(k_cache)) and torch.equal(bits(v_chunked), bits(v_cache))


def test_reference_matches_transformers():
    """The reference (run as a cached-prefix chunk after a first chunk) against transformers' attention math."""
    from transformers import GPTNeoXJapaneseConfig
    from transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese import (
        GPTNeoXJapaneseAttention,
        GPTNeoXJapaneseRotaryEmbedding,
    )

    num_heads, head_dim, seq_len, first = 2, 80, 23, 10
    config = GPTNeoXJapaneseConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                                   max_position_embeddings=64, rope_parameters={
                                       "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    torch.manual_seed(5)
    attention = GPTNeoXJapaneseAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        attention.dense.weight.copy_(torch.eye(num_heads * head_dim))  # read the attention output itself
        hidden = torch.randn(1, seq_len, num_heads * head_dim)
        positions = torch.arange(seq_len)[None]
        causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None]
        expected, _, _ = attention(hidden, causal, positions,
                                   position_embeddings=GPTNeoXJapaneseRotaryEmbedding(config)(hidden, positions))
        qkv = attention.query_key_value(hidden)[0]

    rotary_dims = head_dim // 2
    cos, sin = rotary_tables(rotary_dims, 64, 10000.0, "cpu")
    k_cache = poisoned((4, 16, num_heads, head_dim), torch.float32, "cpu")
    v_cache = poisoned((4, 16, num_heads, head_dim), torch.float32, "cpu")
    block_tables = torch.tensor([[3, 1]], dtype=torch.int32)
    outputs = []
    for start, end in ((0, first), (first, seq_len)):
        outputs.append(prefill_attention_ref(
            qkv[start:end], torch.arange(start, end), torch.tensor([0, end - start], dtype=torch.int32),
            torch.tensor([end], dtype=torch.int32), block_tables, k_cache, v_cache, cos, sin, rotary_dims))
    assert_close(torch.cat(outputs), expected[0], torch.float32, name="reference vs transformers")


def test_split_head_dim():
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(128) == (128, 0)
    assert split_head_dim(72) == (64, 16)
    assert split_head_dim(200) == (128, 128)
    assert split_head_dim(8) == (16, 0)  # wider than the head: the kernel masks lanes 8..15
    assert split_head_dim(1) == (16, 0)
    assert split_head_dim(17) == (16, 16)


def test_no_new_tokens_returns_empty():
    case = make_case([(0, 5)], dtype=torch.float16)
    out = prefill_attention(*case.args())
    assert out.shape == (0, 2 * 80) and out.dtype == torch.float16


def _bad(case: Case, **changes) -> tuple:
    return replace(case, **changes).args()


BAD_ARGUMENTS = {
    "qkv dtype": (lambda c: _bad(c, qkv=c.qkv.double()), "qkv has dtype"),
    "qkv columns": (lambda c: _bad(c, qkv=c.qkv[:, :-3].contiguous()), "qkv has .* columns"),
    "qkv non-contiguous": (lambda c: _bad(c, qkv=c.qkv.t().contiguous().t()), "qkv must be contiguous"),
    "cache dtype": (lambda c: _bad(c, k_cache=c.k_cache.float()), "k_cache has dtype"),
    "v_cache shape": (lambda c: _bad(c, v_cache=c.v_cache[:-1].contiguous()), "v_cache has shape"),
    "head_dim": (lambda c: _bad(c, k_cache=c.k_cache.new_zeros(2, 16, 1, 264), v_cache=c.k_cache.new_zeros(
        2, 16, 1, 264)), "head_dim 264"),
    "positions dtype": (lambda c: _bad(c, positions=c.positions.float()), "positions has dtype"),
    "positions length": (lambda c: _bad(c, positions=c.positions[1:].contiguous()), "positions has"),
    "positions value": (lambda c: _bad(c, positions=c.positions + 1), r"positions\[0\] = 1, expected 0"),
    "cu_seqlens dtype": (lambda c: _bad(c, cu_seqlens=c.cu_seqlens.long()), "cu_seqlens has dtype"),
    "cu_seqlens end": (lambda c: _bad(c, cu_seqlens=c.cu_seqlens - 1), "cu_seqlens must start at 0"),
    "cu_seqlens decreasing": (lambda c: _bad(c, cu_seqlens=torch.tensor([0, 13, 12, 18], dtype=torch.int32)),
                              "non-decreasing"),
    "context too short": (lambda c: _bad(c, context_lens=torch.tensor([3, 40, 4], dtype=torch.int32)),
                          r"context_lens\[0\] = 3 is less than"),
    "context_lens length": (lambda c: _bad(c, context_lens=c.context_lens[:2].contiguous()), "context_lens has 2"),
    "context past rotary table": (lambda c: _bad(c, cos=c.cos[:30].contiguous(), sin=c.sin[:30].contiguous()),
                                  "rotary table length 30"),
    "block table too narrow": (lambda c: _bad(c, block_tables=c.block_tables[:, :2].contiguous()), "only 2 columns"),
    "block id out of range": (lambda c: _bad(c, block_tables=torch.where(
        c.block_tables == c.block_tables[1, 2], 10_000, c.block_tables)), r"block_tables\[1, 2\] = 10000"),
    "negative block id": (lambda c: _bad(c, block_tables=torch.where(
        c.block_tables == c.block_tables[0, 0], -1, c.block_tables)), r"block_tables\[0, 0\] = -1"),
    "block_tables dtype": (lambda c: _bad(c, block_tables=c.block_tables.long()), "block_tables has dtype"),
    "rotary_dims odd": (lambda c: _bad(c, rotary_dims=79), "rotary_dims must be"),
    "rotary_dims vs table": (lambda c: _bad(c, rotary_dims=40), "cos .* and sin"),
    "cos dtype": (lambda c: _bad(c, cos=c.cos.half()), "cos has dtype"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_before_launch(name):
    mutate, match = BAD_ARGUMENTS[name]
    case = make_case([(12, 12), (6, 40), (0, 4)], num_heads=1, dtype=torch.float16)  # new tokens at 0.., 34.., none
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    args = mutate(case)
    with pytest.raises(ValueError, match=match):
        prefill_attention(*args)
    with pytest.raises(ValueError, match=match):
        prefill_attention_ref(*args)
    assert torch.equal(bits(case.k_cache), bits(k_before)) and torch.equal(bits(case.v_cache), bits(v_before))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    case = make_case([(4, 4)])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prefill_attention(*case.args())


def test_attention_scale_is_one_over_sqrt_head_dim(guards):
    """One query over two keys whose scores differ by known amounts: softmax weights pin the scale down."""
    head_dim = 64
    qkv = torch.zeros(2, 3 * head_dim)
    qkv[:, 0] = 1.0  # q = e0 for both tokens
    qkv[0, head_dim] = 0.0  # k0 . q = 0
    qkv[1, head_dim] = 8.0  # k1 . q = 8 -> scaled score 8 / sqrt(64) = 1
    qkv[0, 2 * head_dim] = 1.0  # v0 = e0
    qkv[1, 2 * head_dim + 1] = 1.0  # v1 = e1
    cos, sin = rotary_tables(0, 8, 10000.0, "cpu")
    k_cache = guards.new((1, 16, 1, head_dim), torch.float32, DEVICE, "k_cache")
    v_cache = guards.new((1, 16, 1, head_dim), torch.float32, DEVICE, "v_cache")
    out = prefill_attention(qkv.to(DEVICE), torch.arange(2, device=DEVICE),
                            torch.tensor([0, 2], dtype=torch.int32, device=DEVICE),
                            torch.tensor([2], dtype=torch.int32, device=DEVICE),
                            torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                            k_cache, v_cache, cos.to(DEVICE), sin.to(DEVICE), 0)
    guards.check()
    weight1 = math.e / (1 + math.e)
    assert_close(out[1, :2].cpu(), torch.tensor([1 - weight1, weight1]), torch.float32, name="second query")
    assert_close(out[0, :2].cpu(), torch.tensor([1.0, 0.0]), torch.float32, name="first query (causal)")


def count_index_checks(monkeypatch) -> list[int]:
    """One entry per host-side check of the index values (each a device-to-host copy)."""
    import hayabusa.kernels._attention_checks as checks

    calls: list[int] = []
    check = checks._check_prefill_indices
    monkeypatch.setattr(checks, "_check_prefill_indices", lambda *args: calls.append(1) or check(*args))
    return calls


@pytest.mark.parametrize("op", [prefill_attention, prefill_attention_ref], ids=lambda op: op.__name__)
def test_trusted_indices_give_the_same_result(op, monkeypatch, guards):
    """max_seqlen_q from the host and check_indices=False: the same output and cache writes, and no index check."""
    case = make_case([(9, 9), (4, 21), (0, 5)], num_heads=1, dtype=torch.float16)
    calls = count_index_checks(monkeypatch)
    k_checked, v_checked = guards.copy_of(case.k_cache, "k_cache"), guards.copy_of(case.v_cache, "v_cache")
    checked = op(*case.args(k_checked, v_checked))
    assert len(calls) == 1
    for max_seqlen_q in (9, 13, None):  # exact, an upper bound, read from cu_seqlens
        k_cache, v_cache = guards.copy_of(case.k_cache, "k_cache"), guards.copy_of(case.v_cache, "v_cache")
        out = op(*case.args(k_cache, v_cache), max_seqlen_q=max_seqlen_q, check_indices=False)
        guards.check()
        assert torch.equal(bits(out), bits(checked)), f"out differs with max_seqlen_q={max_seqlen_q}"
        assert torch.equal(bits(k_cache), bits(k_checked)) and torch.equal(bits(v_cache), bits(v_checked))
    assert len(calls) == 1  # no call with check_indices=False checked the indices


@pytest.mark.parametrize("op", [prefill_attention, prefill_attention_ref], ids=lambda op: op.__name__)
@pytest.mark.parametrize("max_seqlen_q, bad_block, match", [
    (11, False, r"max_seqlen_q = 11 is less than the longest sequence's 12 new tokens"),
    (-1, False, "max_seqlen_q must be None or an integer in"),
    (19, False, r"max_seqlen_q must be None or an integer in \[0, qkv rows 18\], got 19"),
    (12.0, False, "max_seqlen_q must be None or an integer"),
    (12, True, r"block_tables\[1, 2\] = 10000"),  # a given max_seqlen_q leaves the index checks on
])
def test_bad_max_seqlen_q_and_checked_indices_raise(op, max_seqlen_q, bad_block, match):
    case = make_case([(12, 12), (6, 40), (0, 4)], num_heads=1, dtype=torch.float16)
    if bad_block:
        case.block_tables[1, 2] = 10_000
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    with pytest.raises(ValueError, match=match):
        op(*case.args(), max_seqlen_q=max_seqlen_q)
    assert torch.equal(bits(case.k_cache), bits(k_before)) and torch.equal(bits(case.v_cache), bits(v_before))
