"""hayabusa.kernels: the Triton kernels of the fast path, each beside a plain-PyTorch `*_ref` of the same signature.

On a machine without CUDA, set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU.
"""

if __name__ == "kernels":
    # Found as the top-level name `kernels`: the checkout root is on sys.path (`python -m` or a notebook started
    # there), and that name belongs to Hugging Face's `kernels` (transformers >= 5.25 requires and imports it).
    # Hand the name to whatever else sys.path holds under it, or else to the empty namespace Python gives a folder
    # without __init__.py, and run nothing of hayabusa's. (This file must exist all the same: pyproject maps this
    # folder to `hayabusa.kernels`, and only an __init__.py can hold that package's re-exports below.)
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        _spec = _machinery.ModuleSpec(__name__, None, is_package=True)
    _sys.modules[__name__] = _module = _util.module_from_spec(_spec)
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    # Exported lazily (PEP 562): the engine's loader and reference model hold QuantizedWeights, and importing
    # hayabusa.kernels.quantized_weight for that must not import Triton and compile-time state with it.
    import importlib as _importlib

    _MODULE_OF = {
        "rotary_tables": "rotary", "apply_rotary_ref": "rotary",
        "prefill_attention": "prefill_attention", "prefill_attention_ref": "prefill_attention",
        "decode_attention": "decode_attention", "decode_attention_ref": "decode_attention",
        "linear": "linear", "linear_ref": "linear",
        "ln_linear": "linear", "ln_linear_ref": "linear",
        "fused_mlp": "mlp", "fused_mlp_ref": "mlp",
        "layer_norm": "layernorm", "layer_norm_ref": "layernorm",
        "QuantizedWeight": "quantized_weight", "dequantize_ref": "quantized_weight",
    }
    __all__ = list(_MODULE_OF)

    def __getattr__(name: str):
        if name not in _MODULE_OF:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
        globals()[name] = value  # later reads find it without calling here
        return value
