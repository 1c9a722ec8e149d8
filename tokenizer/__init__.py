"""hayabusa.tokenizer: GPT-NeoX-Japanese sub-word tokenizer with transformers' ids, and a streaming decoder."""

from .stream import StreamDecoder
from .tokenizer import BatchEncoding, Tokenizer

GPTNeoXJapaneseTokenizer = Tokenizer  # the transformers class name, for drop-in use

__all__ = ["BatchEncoding", "GPTNeoXJapaneseTokenizer", "StreamDecoder", "Tokenizer"]
