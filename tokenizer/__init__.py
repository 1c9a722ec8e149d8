"""hayabusa.tokenizer: GPT-NeoX-Japanese sub-word tokenizer with transformers' ids, and a streaming decoder."""

if __name__ == "tokenizer":
    # Found as the top-level name `tokenizer`: the checkout root is on sys.path (`python -m` or a notebook started
    # there), and that name belongs to the PyPI distribution `tokenizer`.
    # Hand the name to whatever else sys.path holds under it, or else to the empty namespace Python gives a folder
    # without __init__.py, and run nothing of hayabusa's. (This file must exist all the same: pyproject maps this
    # folder to `hayabusa.tokenizer`, and only an __init__.py can hold that package's re-exports below.)
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
    from .stream import StreamDecoder
    from .tokenizer import BatchEncoding, Tokenizer

    GPTNeoXJapaneseTokenizer = Tokenizer  # the transformers class name, for drop-in use

    __all__ = ["BatchEncoding", "GPTNeoXJapaneseTokenizer", "StreamDecoder", "Tokenizer"]
