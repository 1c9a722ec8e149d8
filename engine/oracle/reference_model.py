"""The plain-PyTorch reference model: the oracle the kernels are checked against, and the CPU fallback.

One file, no Triton. The math follows transformers' GPTNeoXJapaneseForCausalLM step by step (so fp32 logits
agree to ~1e-6) but runs on the weights as a flat HF state dict and a simple contiguous KV cache. A quantized Linear
weight (QuantizedWeight) is dequantized for each use (`linear`): the model holds no dense copy of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.tensor_names import (
    EMBED_IN,
    EMBED_OUT,
    FINAL_LN_BIAS,
    FINAL_LN_WEIGHT,
    LayerWeights,
    LinearWeight,
    layer_weights,
)
from hayabusa.kernels.quantized_weight import QuantizedWeight, dequantize_ref


def linear(x: Tensor, weight: LinearWeight) -> Tensor:
    """x @ weight.T in x's dtype; a QuantizedWeight is dequantized first ((q - zero) * scale in the scales' dtype,
    compressed-tensors' arithmetic), then cast to x's dtype."""
    if isinstance(weight, QuantizedWeight):
        weight = dequantize_ref(weight).to(x.dtype)
    return F.linear(x, weight)


def rotary_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """inv_freq[i] = 1 / base^(2i / rotary_dims), float32 [rotary_dims // 2]."""
    dims = config.rotary_dims
    return 1.0 / (config.rope_theta ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rotary_dims: int) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [B, 1, T, rotary_dims] in x's dtype. Rotates the first rotary_dims."""
    x_rot, x_pass = x[..., :rotary_dims], x[..., rotary_dims:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class KVCache:
    """Contiguous cache: per layer k and v of shape [batch, heads, max_len, head_dim]; `length` slots filled."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (batch, config.num_attention_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, D] at the next T slots; return all keys/values so far [B, H, length + T, D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; {end} needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Row i becomes a copy of row rows[i] (rows: int64 [new_batch]); beam search continues each new beam from
        its parent's cache this way."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class ReferenceModel:
    def __init__(self, config: ModelConfig, state_dict: dict[str, LinearWeight]) -> None:
        self.config = config
        self.embed_in = state_dict[EMBED_IN]  # [vocab, hidden]
        self.layers = [layer_weights(config, state_dict, i) for i in range(config.num_hidden_layers)]
        self.final_ln_weight = state_dict[FINAL_LN_WEIGHT]
        self.final_ln_bias = state_dict[FINAL_LN_BIAS]
        self.embed_out = state_dict[EMBED_OUT]  # [vocab, hidden]; may be the same tensor as embed_in
        self.inv_freq = rotary_inv_freq(config, self.embed_in.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_in.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_in.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.forward(*args, **kwargs)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                key_mask: Tensor | None = None, last_token_only: bool = False) -> Tensor:
        """input_ids, positions: [B, T]; key_mask: [B, cache.length + T] bool, False for padding slots.

        Returns logits [B, T, vocab] (or [B, 1, vocab] with last_token_only), float32.
        """
        hidden = self.hidden_states(input_ids, positions, cache, key_mask)[-1]
        if last_token_only:
            hidden = hidden[:, -1:]
        return linear(hidden, self.embed_out).float()

    @torch.inference_mode()
    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                      key_mask: Tensor | None = None) -> list[Tensor]:
        """The input to every layer, then the final-LayerNorm output: num_layers + 1 tensors [B, T, hidden]."""
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(positions.max())} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        mask = self._attention_bias(batch, seq, past, key_mask, input_ids.device)  # [B, 1, T, past + T]

        # Rotary tables as transformers builds them: fp32 angles, cast to the model dtype.
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, rotary_dims / 2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rotary_dims]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)

        h = F.embedding(input_ids, self.embed_in)  # [B, T, hidden]
        outputs = []
        for i, layer in enumerate(self.layers):
            outputs.append(h)
            h = self._layer(i, layer, h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += seq
        outputs.append(F.layer_norm(h, (h.shape[-1],), self.final_ln_weight, self.final_ln_bias,
                                    self.config.layer_norm_eps))
        return outputs

    def _attention_bias(self, batch: int, seq: int, past: int, key_mask: Tensor | None,
                        device: torch.device) -> Tensor:
        """0 where a query may attend a key, the dtype's minimum elsewhere (causal + padding)."""
        total = past + seq
        query_slot = torch.arange(past, total, device=device)[:, None]
        allowed = (torch.arange(total, device=device)[None, :] <= query_slot)[None]  # [1, T, total]
        if key_mask is not None:
            if key_mask.shape != (batch, total):
                raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected {(batch, total)}")
            allowed = allowed & key_mask[:, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        return bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]

    def _layer(self, index: int, w: LayerWeights, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
               cache: KVCache | None) -> Tensor:
        cfg = self.config
        batch, seq, hidden = h.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        x = F.layer_norm(h, (hidden,), w.ln1_weight, w.ln1_bias, cfg.layer_norm_eps)
        qkv = linear(x, w.qkv_weight).view(batch, seq, heads, 3 * head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(head_dim, dim=-1)  # each [B, H, T, D]
        q = apply_rotary(q, cos, sin, cfg.rotary_dims)
        k = apply_rotary(k, cos, sin, cfg.rotary_dims)
        if cache is not None:
            k, v = cache.update(index, k, v)

        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + mask  # [B, H, T, S]
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        attn = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(batch, seq, hidden)
        attn = linear(attn, w.dense_weight)
        if w.dense_bias is not None:
            attn = attn + w.dense_bias
        h = h + attn

        x = F.layer_norm(h, (hidden,), w.ln2_weight, w.ln2_bias, cfg.layer_norm_eps)
        mlp = linear(F.gelu(linear(x, w.mlp_in_weight)), w.mlp_out_weight)
        return h + mlp
