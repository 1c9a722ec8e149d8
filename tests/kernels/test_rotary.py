"""Rotary tables and the reference rotation against transformers' own rotary code (the oracle)."""

import pytest
import torch
from transformers import GPTNeoXJapaneseConfig
from transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese import (
    GPTNeoXJapaneseRotaryEmbedding,
    apply_rotary_pos_emb,
)

from hayabusa.kernels.rotary import apply_rotary_ref, rotary_tables


def hf_cos_sin(head_dim: int, partial_rotary_factor: float, base: float, positions: torch.Tensor):
    """transformers' cos/sin for `positions`: each [len(positions), rotary_dims] (the half table repeated)."""
    config = GPTNeoXJapaneseConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": base, "partial_rotary_factor": partial_rotary_factor},
    )
    x = torch.zeros(1, len(positions), head_dim)  # only its dtype/device are read
    cos, sin = GPTNeoXJapaneseRotaryEmbedding(config)(x, positions[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("head_dim, factor, base", [(80, 1.0, 10000.0), (80, 0.5, 10000.0), (64, 0.25, 500.0)])
def test_tables_and_rotation_match_transformers_exactly(head_dim, factor, base):
    rotary_dims = int(head_dim * factor)
    half = rotary_dims // 2
    positions = torch.tensor([0, 1, 2, 7, 100, 511, 1023, 2047, 4095])
    hf_cos, hf_sin = hf_cos_sin(head_dim, factor, base, positions)
    cos, sin = rotary_tables(rotary_dims, 4096, base, "cpu")
    assert cos.shape == sin.shape == (4096, half) and cos.dtype == torch.float32
    # cat(freqs, freqs): both halves of transformers' table are our table
    assert torch.equal(hf_cos[:, :half], cos[positions]) and torch.equal(hf_cos[:, half:], cos[positions])
    assert torch.equal(hf_sin[:, :half], sin[positions]) and torch.equal(hf_sin[:, half:], sin[positions])

    # q: [heads, tokens, head_dim] in fp32: the reference equals transformers bit for bit
    torch.manual_seed(0)
    q = torch.randn(3, len(positions), head_dim)
    k = torch.randn(3, len(positions), head_dim)
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dims], k[..., :rotary_dims], hf_cos, hf_sin, unsqueeze_dim=0)
    expected_q = torch.cat((q_rot, q[..., rotary_dims:]), dim=-1)
    expected_k = torch.cat((k_rot, k[..., rotary_dims:]), dim=-1)
    assert torch.equal(apply_rotary_ref(q, cos[positions], sin[positions]), expected_q)
    assert torch.equal(apply_rotary_ref(k, cos[positions], sin[positions]), expected_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_rounds_once_to_model_dtype(dtype):
    torch.manual_seed(1)
    cos, sin = rotary_tables(16, 64, 10000.0, "cpu")
    positions = torch.randint(0, 64, (5,))
    x = torch.randn(5, 2, 24).to(dtype)
    out = apply_rotary_ref(x, cos[positions][:, None], sin[positions][:, None])
    expected = apply_rotary_ref(x.float(), cos[positions][:, None], sin[positions][:, None]).to(dtype)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(out[..., 16:], x[..., 16:])  # the non-rotary tail passes through untouched


def test_zero_rotary_dims_is_identity():
    cos, sin = rotary_tables(0, 8, 10000.0, "cpu")
    assert cos.shape == (8, 0)
    x = torch.randn(8, 3, 80)
    assert torch.equal(apply_rotary_ref(x, cos[:, None], sin[:, None]), x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rotary_dims=7, max_positions=8, base=10000.0), "rotary_dims"),
    (dict(rotary_dims=-2, max_positions=8, base=10000.0), "rotary_dims"),
    (dict(rotary_dims=8, max_positions=0, base=10000.0), "max_positions"),
    (dict(rotary_dims=8, max_positions=8, base=0.0), "base"),
])
def test_tables_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rotary_tables(device="cpu", **kwargs)


def test_reference_rejects_rotary_wider_than_head():
    cos, sin = rotary_tables(16, 4, 10000.0, "cpu")
    with pytest.raises(ValueError, match="exceeds head_dim"):
        apply_rotary_ref(torch.randn(4, 8), cos, sin)
