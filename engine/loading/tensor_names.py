"""The checkpoint's tensor names, as transformers' GPTNeoXJapaneseForCausalLM stores them: every parameter's name and
shape (`expected_shapes`, what the loader checks and the checkpoint writer writes), the Linear modules a quantization
covers, and one layer's weights by the role each plays (`layer_weights`, what both models read; a Linear's weight is
a dense tensor or a QuantizedWeight).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hayabusa.engine.loading.config import ModelConfig
from hayabusa.kernels.quantized_weight import QuantizedWeight

PREFIX = "gpt_neox_japanese."
EMBED_IN = PREFIX + "embed_in.weight"
EMBED_OUT = "embed_out.weight"
FINAL_LN_WEIGHT = PREFIX + "final_layer_norm.weight"
FINAL_LN_BIAS = PREFIX + "final_layer_norm.bias"
LAYER_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
LinearWeight = Tensor | QuantizedWeight  # a Linear's weight [N, K]: dense, or int8 / int4 codes with scales


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every parameter of GPTNeoXJapaneseForCausalLM, in the order HF stores them."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {EMBED_IN: (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"{PREFIX}layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.input_layernorm.bias": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.bias": (hidden,),
            f"{layer}.attention.query_key_value.weight": (3 * hidden, hidden),  # rows per head: [q | k | v]
            f"{layer}.attention.dense.weight": (hidden, hidden),
        }
        if i == config.num_hidden_layers - 1:  # only the last layer's attention output has a bias
            shapes[f"{layer}.attention.dense_bias"] = (hidden,)
        shapes[f"{layer}.mlp.dense_h_to_4h.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.dense_4h_to_h.weight"] = (hidden, inter)
    shapes[FINAL_LN_WEIGHT] = (hidden,)
    shapes[FINAL_LN_BIAS] = (hidden,)
    shapes[EMBED_OUT] = (vocab, hidden)
    return shapes


def layer_linear_weights(config: ModelConfig) -> list[str]:
    """The weight names of every layer's Linear modules (what --quantization quantizes), in storage order."""
    return [f"{PREFIX}layers.{i}.{linear}.weight" for i in range(config.num_hidden_layers) for linear in LAYER_LINEARS]


def weight_modules(config: ModelConfig) -> dict[str, str]:
    """Every module holding a weight a quantization config could target -> its class in transformers."""
    modules = {EMBED_IN.removesuffix(".weight"): "Embedding"}
    modules |= {name.removesuffix(".weight"): "Linear" for name in layer_linear_weights(config)}
    return modules | {EMBED_OUT.removesuffix(".weight"): "Linear"}


@dataclass
class LayerWeights:
    """One layer's weights by role (the state dict's tensors themselves, not copies)."""

    ln1_weight: Tensor  # [hidden]
    ln1_bias: Tensor
    qkv_weight: LinearWeight  # [3 * hidden, hidden], rows per head: [q | k | v]
    dense_weight: LinearWeight  # [hidden, hidden]
    dense_bias: Tensor | None  # [hidden], last layer only
    ln2_weight: Tensor
    ln2_bias: Tensor
    mlp_in_weight: LinearWeight  # [intermediate, hidden]
    mlp_out_weight: LinearWeight  # [hidden, intermediate]


def layer_weights(config: ModelConfig, state_dict: dict[str, LinearWeight], i: int) -> LayerWeights:
    """Layer i's weights out of a state dict keyed by the names above."""
    p = f"{PREFIX}layers.{i}."
    last = i == config.num_hidden_layers - 1
    return LayerWeights(
        ln1_weight=state_dict[p + "input_layernorm.weight"],
        ln1_bias=state_dict[p + "input_layernorm.bias"],
        qkv_weight=state_dict[p + "attention.query_key_value.weight"],
        dense_weight=state_dict[p + "attention.dense.weight"],
        dense_bias=state_dict[p + "attention.dense_bias"] if last else None,
        ln2_weight=state_dict[p + "post_attention_layernorm.weight"],
        ln2_bias=state_dict[p + "post_attention_layernorm.bias"],
        mlp_in_weight=state_dict[p + "mlp.dense_h_to_4h.weight"],
        mlp_out_weight=state_dict[p + "mlp.dense_4h_to_h.weight"],
    )
