"""GPT-NeoX-Japanese on the hayabusa kernels over a paged KV cache, for packed (varlen) batches.

Per layer: ln_linear(input_layernorm -> qkv) -> prefill_attention | decode_attention (rotary and the cache write inside)
-> linear(dense, + residual, + dense_bias on the last layer) -> fused_mlp (kernels/mlp.py:
ln_linear(post_attention_layernorm -> dense_h_to_4h, GELU) -> linear(dense_4h_to_h, + residual)). Then
ln_linear(final_layer_norm -> embed_out) on the last token of each sequence only (`prefill`); a caller that needs logits
at more positions (prompt logprobs) takes the residual stream from `prefill_hidden` and runs `lm_head` on the rows it
wants. The residual stream h is updated in place: h = h + attn(ln1(h)), then h = h + mlp(ln2(h)). At decode sizes each
op is one launch (the LayerNorms run in the next GEMM's prologue): five per layer, plus the embedding gather and the LM
head.

It runs on either op set (engine.model.op_sets): the Triton kernels, or their plain-PyTorch twins. A Linear's weight
may be a QuantizedWeight (int8 / int4 codes with scales): the op sets' linear functions take either, and the
dequantization happens inside them (inside the GEMV or GEMM launch on the Triton op set), so a decode step launches
what it launches on dense weights and no dense copy of a quantized weight exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.quantized_tensors import scheme_counts
from hayabusa.engine.loading.tensor_names import (
    EMBED_IN,
    EMBED_OUT,
    FINAL_LN_BIAS,
    FINAL_LN_WEIGHT,
    LayerWeights,
    LinearWeight,
    expected_shapes,
    layer_weights,
)
from hayabusa.engine.model.op_sets import OpSet
from hayabusa.kernels._attention_checks import MAX_HEAD_DIM
from hayabusa.kernels.quantized_weight import QuantizedWeight
from hayabusa.kernels.rotary import rotary_tables


@dataclass
class PrefillInputs:
    """A packed batch of new tokens (T in all, S sequences), laid out as prefill_attention expects."""

    input_ids: Tensor  # int64 [T]
    positions: Tensor  # int32 [T]
    cu_seqlens: Tensor  # int32 [S + 1], new tokens of sequence i are rows cu_seqlens[i]:cu_seqlens[i + 1]
    context_lens: Tensor  # int32 [S], cached prefix + new tokens
    block_tables: Tensor  # int32 [S, max_blocks_per_seq]
    last_token_rows: Tensor  # int64 [S], the row of each sequence's last new token
    # Set by a builder that knows these on the host (ModelRunner); the defaults make every layer's attention read
    # the index tensors back from the device to size its grid and check every index.
    max_seqlen_q: int | None = None  # most new tokens of any sequence
    check_indices: bool = True  # False: valid by construction (block ids from the pool, positions < max length)
    # Rows past cu_seqlens[-1] (ModelRunner pads T to a bucket so the kernels see finitely many shapes): computed
    # row-wise, never attended, never read; their attention output is zeroed so they stay finite.
    num_padding_rows: int = 0


@dataclass
class DecodeInputs:
    input_ids: Tensor  # int64 [B]
    positions: Tensor  # int32 [B]; -1 marks a padding row (CUDA-graph batch padding)
    block_tables: Tensor  # int32 [B, max_blocks_per_seq]
    check_indices: bool = True  # False: valid by construction, no device->host copy per layer (see PrefillInputs)


KVCaches = list[tuple[Tensor, Tensor]]  # per layer (k_cache, v_cache): [num_blocks, block_size, heads, head_dim]
Attend = Callable[[Tensor, Tensor, Tensor, bool], Tensor]  # (qkv, k_cache, v_cache, checked) -> [tokens, hidden]


class PagedModel:
    def __init__(self, config: ModelConfig, state_dict: dict[str, LinearWeight], ops: OpSet) -> None:
        if config.head_dim > MAX_HEAD_DIM:  # refused at load, not at the first forward
            raise ValueError(f"config keys 'hidden_size' {config.hidden_size} / 'num_attention_heads' "
                             f"{config.num_attention_heads} give head_dim {config.head_dim}; the paged attention "
                             f"ops support head_dim up to {MAX_HEAD_DIM}")
        self.config = config
        self.ops = ops
        self.shapes = expected_shapes(config)
        if EMBED_IN not in state_dict:
            raise ValueError(f"state dict has no tensor {EMBED_IN!r}")
        if isinstance(state_dict[EMBED_IN], QuantizedWeight):  # a gather, not a Linear
            raise ValueError(f"tensor {EMBED_IN!r} is a QuantizedWeight; only Linear weights may be quantized")
        self.dtype = state_dict[EMBED_IN].dtype
        self.device = state_dict[EMBED_IN].device
        weights = {name: self._checked(name, state_dict) for name in self.shapes if name != EMBED_OUT}
        # Tied: one copy, as the loader hands it over.
        weights[EMBED_OUT] = weights[EMBED_IN] if state_dict.get(EMBED_OUT) is state_dict[EMBED_IN] \
            else self._checked(EMBED_OUT, state_dict)
        # The quantized Linears by scheme (scheme_counts), as loaded: a packed weight no longer says.
        self.weight_schemes = scheme_counts(weights[name] for name in weights if name != EMBED_IN)
        # Each linear weight in the form the op set's linear ops read fastest (on a CPU: packed once, here).
        self.layers = [self._packed(layer_weights(config, weights, i)) for i in range(config.num_hidden_layers)]
        self.embed_out = ops.pack_linear_weight(weights[EMBED_OUT], self.dtype)
        linears = [self.embed_out] + [w for layer in self.layers for w in (layer.qkv_weight, layer.dense_weight,
                                                                           layer.mlp_in_weight, layer.mlp_out_weight)]
        # Whether every linear weight is a packed copy: then the rest is copied too, so that the loaded weights
        # (one host arena, see loading/host_arena.py) can be freed by whoever holds them (Engine does).
        self.owns_weights = all(not isinstance(w, Tensor | QuantizedWeight) for w in linears)
        own = Tensor.clone if self.owns_weights else lambda tensor: tensor
        self.layers = [replace(layer, ln1_weight=own(layer.ln1_weight), ln1_bias=own(layer.ln1_bias),
                               ln2_weight=own(layer.ln2_weight), ln2_bias=own(layer.ln2_bias),
                               dense_bias=None if layer.dense_bias is None else own(layer.dense_bias))
                       for layer in self.layers]
        self.embed_in = own(weights[EMBED_IN])
        self.final_ln_weight = own(weights[FINAL_LN_WEIGHT])
        self.final_ln_bias = own(weights[FINAL_LN_BIAS])
        self.cos, self.sin = rotary_tables(config.rotary_dims, config.max_position_embeddings, config.rope_theta,
                                           self.device)  # float32 [max_positions, rotary_dims // 2]

    def _packed(self, layer: LayerWeights) -> LayerWeights:
        pack = functools.partial(self.ops.pack_linear_weight, dtype=self.dtype)
        return replace(layer, qkv_weight=pack(layer.qkv_weight), dense_weight=pack(layer.dense_weight),
                       mlp_in_weight=pack(layer.mlp_in_weight), mlp_out_weight=pack(layer.mlp_out_weight))

    def _checked(self, name: str, state_dict: dict[str, LinearWeight]) -> LinearWeight:
        if name not in state_dict:
            raise ValueError(f"state dict has no tensor {name!r}")
        tensor = state_dict[name]
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {self.shapes[name]}")
        if isinstance(tensor, QuantizedWeight):  # its own checks ran when it was made (codes, scales, zeros)
            if tensor.device != self.device:
                raise ValueError(f"tensor {name!r} is on {tensor.device}; embed_in is on {self.device}")
            return tensor
        if tensor.dtype != self.dtype or tensor.device != self.device:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} on {tensor.device}; embed_in is {self.dtype} "
                             f"on {self.device} (load every weight with one dtype and device)")
        return tensor.contiguous()  # a no-op for loaded weights; the kernels need row-major

    def linear_weights(self) -> list[object]:
        """Every Linear's weight as the op set runs it (on a CPU packed: kernels/cpu_linear.py): each layer's qkv,
        dense, MLP in and out, then the LM head."""
        return [*(weight for layer in self.layers for weight in (layer.qkv_weight, layer.dense_weight,
                                                                  layer.mlp_in_weight, layer.mlp_out_weight)),
                self.embed_out]

    def weight_bytes_per_decode_step(self, batch: int) -> int:
        """Bytes of weights one decode step of `batch` sequences reads: every layer's weights (a quantized Linear's
        codes, scales and zero codes), the final LayerNorm, the LM head, and `batch` rows of the embedding."""
        vectors = [vector for layer in self.layers
                   for vector in (layer.ln1_weight, layer.ln1_bias, layer.dense_bias, layer.ln2_weight, layer.ln2_bias)
                   if vector is not None]
        read = [*self.linear_weights(), *vectors, self.final_ln_weight, self.final_ln_bias]
        return sum(weight.nbytes for weight in read) + batch * self.embed_in[0].nbytes

    def prefill(self, inputs: PrefillInputs, kv_caches: KVCaches) -> Tensor:
        """Logits of each sequence's last new token: [S, vocab] in the model dtype; writes the new tokens' KV."""
        return self.lm_head(self.prefill_hidden(inputs, kv_caches)[inputs.last_token_rows])

    def prefill_hidden(self, inputs: PrefillInputs, kv_caches: KVCaches) -> Tensor:
        """The residual stream after the last layer, every new token: [T, hidden]; writes the new tokens' KV."""
        return self._layers(inputs.input_ids, self._prefill_attend(inputs), kv_caches)

    def decode(self, inputs: DecodeInputs, kv_caches: KVCaches, logits_out: Tensor | None = None) -> Tensor:
        """Logits of the one new token per sequence: [B, vocab] in the model dtype (into logits_out when given);
        writes its KV."""
        def attend(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, checked: bool) -> Tensor:
            return self.ops.decode_attention(qkv, inputs.positions, inputs.block_tables, k_cache, v_cache,
                                             self.cos, self.sin, self.config.rotary_dims,
                                             check_indices=inputs.check_indices, checked=checked)

        return self.lm_head(self._layers(inputs.input_ids, attend, kv_caches), out=logits_out)

    def prefill_hidden_states(self, inputs: PrefillInputs, kv_caches: KVCaches) -> list[Tensor]:
        """Like ReferenceModel.hidden_states: each layer's input, then the final LayerNorm output; [T, hidden]."""
        states: list[Tensor] = []
        hidden = self._layers(inputs.input_ids, self._prefill_attend(inputs), kv_caches, states)
        states.append(self.ops.layer_norm(hidden, self.final_ln_weight, self.final_ln_bias,
                                          self.config.layer_norm_eps))
        return states

    def _prefill_attend(self, inputs: PrefillInputs) -> Attend:
        def attend(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, checked: bool) -> Tensor:
            out = self.ops.prefill_attention(qkv, inputs.positions, inputs.cu_seqlens, inputs.context_lens,
                                             inputs.block_tables, k_cache, v_cache, self.cos, self.sin,
                                             self.config.rotary_dims, max_seqlen_q=inputs.max_seqlen_q,
                                             check_indices=inputs.check_indices, checked=checked)
            if inputs.num_padding_rows:  # the kernel never writes rows no sequence owns
                out[-inputs.num_padding_rows:] = 0
            return out

        return attend

    def _layers(self, input_ids: Tensor, attend: Attend, kv_caches: KVCaches,
                states: list[Tensor] | None = None) -> Tensor:
        """The residual stream after every layer: [tokens, hidden].

        Every op's arguments are valid by construction (weights checked at load, activations made here), so they
        run unchecked; the first layer's attention checks the step's inputs (positions, block tables, caches) once.
        """
        eps = self.config.layer_norm_eps
        h = F.embedding(input_ids, self.embed_in)  # [tokens, hidden]
        for index, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if states is not None:
                states.append(h.clone())
            qkv = self.ops.ln_linear(h, layer.ln1_weight, layer.ln1_bias, eps, layer.qkv_weight,
                                     checked=False)  # [tokens, heads * 3 * head_dim]
            attn = attend(qkv, k_cache, v_cache, index == 0)  # [tokens, hidden]
            h = self.ops.linear(attn, layer.dense_weight, bias=layer.dense_bias, residual=h, out=h, checked=False)
            h = self.ops.mlp(h, layer.ln2_weight, layer.ln2_bias, eps, layer.mlp_in_weight, layer.mlp_out_weight,
                             out=h, checked=False)  # through [tokens, intermediate]
        return h

    def lm_head(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """hidden: [S, hidden], the last layer's output at the positions whose next token is wanted -> logits
        [S, vocab] in the model dtype (the final LayerNorm fused into the GEMM), into out when given."""
        return self.ops.ln_linear(hidden.contiguous(), self.final_ln_weight, self.final_ln_bias,
                                  self.config.layer_norm_eps, self.embed_out, out=out, checked=False)
