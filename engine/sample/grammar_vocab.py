"""The model's vocabulary as the grammar engine sees it: each token id's bytes, exactly what the tokenizer's decode
writes for it, so that a text the grammar accepts token by token is the text the user gets.

- `<|byteN|>` tokens are the single byte N: a character spelled in bytes is accepted byte by byte (the grammar works
  on UTF-8), and decode joins the run back into that character.
- Class tokens are the text decode writes for them: `<SP>` a space, `<BR>` a newline, `<TAB>` a tab, `<BLOCK>` "▀",
  `<KIGOU>` "ǀ", `<U2000U2BFF>` "‖", each `<|emojiN|>` its emoji, a variant line its first spelling. Their text
  does not encode back to them (the tokenizer folds every symbol of a class into one token), which does not matter
  here: the grammar reads the decoded text, so such a token is allowed exactly where its decoded text is.
- Control tokens (`<|startoftext|>`, `<|separator|>`, `<|nottoken|>`), the request's eos ids and tokens that decode
  to nothing are special (llguidance's 0xFF prefix): no grammar ever allows them as text; eos is allowed only where
  the grammar can end.
"""

from __future__ import annotations

from hayabusa.tokenizer import Tokenizer

CONTROL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|separator|>", "<|nottoken|>")
SPECIAL_PREFIX = b"\xff"  # llguidance's mark of a special token: never matched by grammar text


def token_bytes(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int
                ) -> tuple[list[bytes], list[int]]:
    """(bytes of each of the model's vocab_size token ids, the special token ids) for llguidance's tokenizer. Ids
    the tokenizer does not have (a model vocabulary padded past it) are special: they are never text."""
    controls = {tokenizer.convert_tokens_to_ids(piece) for piece in CONTROL_TOKENS}  # a missing one: unk, also eos
    tokens: list[bytes] = []
    specials: list[int] = []
    for token_id in range(vocab_size):
        if token_id >= tokenizer.vocab_size:
            specials.append(token_id)
            tokens.append(SPECIAL_PREFIX + f"<|padding{token_id}|>".encode())
            continue
        byte_value = tokenizer.byte_value(token_id)
        if byte_value >= 0:
            tokens.append(bytes((byte_value,)))
            continue
        text = tokenizer.token_text(token_id)
        if token_id in controls or token_id in eos_token_ids or not text:
            specials.append(token_id)
            tokens.append(SPECIAL_PREFIX + (tokenizer.convert_ids_to_tokens(token_id) or f"<|empty{token_id}|>")
                          .encode())
            continue
        tokens.append(text.encode())
    return tokens, specials


class GrammarTokenizer:
    """What llguidance's TokenizerWrapper reads: tokens (bytes per id), eos, bos, special ids, and a tokenize call.

    llguidance tokenizes the text a grammar forces (the only way on, e.g. the rest of a fixed string) and allows
    those tokens, so the call must give tokens whose bytes spell the text exactly. The tokenizer's own encoding does
    not always: it folds whitespace and maps whole classes of symbols to one token ("▀" encodes to <U2000U2BFF>, which
    decodes to "‖"). Where it does not decode back to the text, the text's UTF-8 bytes as <|byteN|> tokens do."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int) -> None:
        self.tokens, self.special_token_ids = token_bytes(tokenizer, eos_token_ids, vocab_size)
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer
        self._byte_ids = {tokenizer.byte_value(i): i for i in range(min(vocab_size, tokenizer.vocab_size))
                          if tokenizer.byte_value(i) >= 0}

    def __call__(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text)
        if self._tokenizer.decode(ids) == text or not all(b in self._byte_ids for b in text.encode()):
            return ids
        return [self._byte_ids[b] for b in text.encode()]


def llguidance_tokenizer(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...],
                         vocab_size: int):  # -> llguidance.LLTokenizer
    """llguidance's tokenizer for the model's vocab_size ids of this vocabulary, ended by these eos ids (~70 ms for
    32k tokens: cache it)."""
    import llguidance

    if not eos_token_ids:
        raise ValueError("structured outputs need an eos token id to end the text (the model has none: pass "
                         "eos_token_id)")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(GrammarTokenizer(tokenizer, eos_token_ids, vocab_size)),
                                  eos_token=list(eos_token_ids))
