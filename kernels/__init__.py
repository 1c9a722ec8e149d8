"""hayabusa.kernels: the Triton kernels of the fast path, each beside a plain-PyTorch `*_ref` of the same signature.

On a machine without CUDA, set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU.
"""

from .decode_attention import decode_attention, decode_attention_ref
from .layernorm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from .linear import linear, linear_ref, ln_linear, ln_linear_ref
from .mlp import fused_mlp, fused_mlp_ref
from .prefill_attention import prefill_attention, prefill_attention_ref
from .rotary import apply_rotary_ref, rotary_tables

__all__ = [
    "rotary_tables", "apply_rotary_ref",
    "prefill_attention", "prefill_attention_ref",
    "decode_attention", "decode_attention_ref",
    "linear", "linear_ref",
    "ln_linear", "ln_linear_ref",
    "fused_mlp", "fused_mlp_ref",
    "layer_norm", "layer_norm_ref",
    "add_layer_norm", "add_layer_norm_ref",
]
