"""OpenAI's completions `logprobs` object from the engine's TokenLogprobs: each token's text, its logprob, the most
likely alternatives by text, and where its text starts in the choice's text.

A token's text is what decoding writes for it; a `<|byteN|>` token (one byte of a character the vocabulary lacks)
is named by that spelling. Its offset counts the characters decoded before it, so the bytes of one character all
point at that character. Alternatives whose texts coincide keep the most likely one (a dict by text, as OpenAI's).
"""

from __future__ import annotations

from collections.abc import Sequence

from hayabusa.engine.outputs import TokenLogprobs
from hayabusa.engine.server.protocol import CompletionLogprobs
from hayabusa.tokenizer import StreamDecoder, Tokenizer


class ChoiceLogprobs:
    """One run of tokens of a choice (its echoed prompt, or its completion), logprobs built piece by piece: a stream
    sends each update's piece, a plain response one piece for all."""

    def __init__(self, tokenizer: Tokenizer, start_offset: int = 0) -> None:
        self._tokenizer = tokenizer
        self._decoder = StreamDecoder(tokenizer)
        self._offset = start_offset  # characters of the choice's text before the next token

    def piece(self, entries: Sequence[TokenLogprobs | None], token_ids: Sequence[int]) -> CompletionLogprobs:
        """entries: one per token id (None: a prompt's first token, which has no logprob)."""
        piece = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry, token_id in zip(entries, token_ids, strict=True):
            piece.tokens.append(self._token_text(token_id))
            piece.token_logprobs.append(None if entry is None else entry.logprob)
            piece.top_logprobs.append(None if entry is None else self._top(entry))
            piece.text_offset.append(self._offset)
            self._offset += len(self._decoder.push(token_id))
        return piece

    def _top(self, entry: TokenLogprobs) -> dict[str, float]:
        top: dict[str, float] = {}
        for token_id, logprob in entry.top:  # most likely first
            top.setdefault(self._token_text(token_id), logprob)
        return top

    def _token_text(self, token_id: int) -> str:
        if self._tokenizer.byte_value(token_id) < 0:
            return self._tokenizer.token_text(token_id)
        return self._tokenizer.convert_ids_to_tokens(token_id)  # "<|byteN|>"


def joined(pieces: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    """The pieces as one object, in order (an echoed prompt's, then the completion's)."""
    return CompletionLogprobs(tokens=[t for p in pieces for t in p.tokens],
                              token_logprobs=[lp for p in pieces for lp in p.token_logprobs],
                              top_logprobs=[top for p in pieces for top in p.top_logprobs],
                              text_offset=[offset for p in pieces for offset in p.text_offset])
