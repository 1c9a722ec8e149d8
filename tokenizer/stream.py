"""Incremental detokenization for streaming generation: one id in, the text that became final out."""

from __future__ import annotations

import codecs

from .tokenizer import Tokenizer


class StreamDecoder:
    """push(id) returns a text delta; the deltas (plus flush()) concatenate to tokenizer.decode(all ids).

    A character spelled by `<|byteN|>` tokens is held back until its last byte arrives, so no delta ends inside
    a character; bytes that cannot complete a character come out as U+FFFD exactly where decode puts them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._vocab_size = tokenizer.vocab_size
        self._byte_value = tokenizer.byte_value
        self._token_text = tokenizer.token_text
        self._skip = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after_bytes = False  # a byte id came since the last flush: the byte decoder may hold a partial char

    def push(self, token_id: int) -> str:
        # Called once per generated token of every running request: the common path (a text id after text ids)
        # is one check and one list lookup.
        if type(token_id) is not int or not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token_id must be an int in [0, {self._vocab_size}), got {token_id!r}")
        if self._skip and token_id in self._skip:
            return ""
        byte_value = self._byte_value(token_id)
        if byte_value >= 0:
            self._after_bytes = True
            return self._bytes.decode(bytes((byte_value,)))
        if self._after_bytes:
            self._after_bytes = False
            return self._bytes.decode(b"", final=True) + self._token_text(token_id)
        return self._token_text(token_id)

    def flush(self) -> str:
        """Text still held back (an unfinished byte sequence, as U+FFFD); call once the ids end."""
        self._after_bytes = False
        return self._bytes.decode(b"", final=True)
