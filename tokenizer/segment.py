"""Sub-word segmentation of rewritten text into ids (Japanese-BPEEncoder_V2 rules).

At each position:
  - a '<' starts a tag: the longest vocabulary entry of three or more characters starting there wins (`<SP>`,
    `<|emoji4|>`, `<|byte65|>`, ...); without one, the shorter entries compete by the rule below;
  - otherwise the 1-, 2- and 3-character prefixes that are vocabulary entries compete and the one with the
    smallest id wins (not the longest);
  - a character with no entry becomes `<KIGOU>` (U+00A1-00BF, U+01C0-01C3, U+02B9-0362), `<U2000U2BFF>`
    (U+2000-2BFF) or its UTF-8 bytes as `<|byteN|>` tokens.
The decision at a position depends only on the next three characters, so it is memoised per 3-character window:
the loop then costs one slice and one dict lookup per token.
"""

from __future__ import annotations

from .vocab import Vocabulary

_MAX_CACHED_WINDOWS = 1 << 18  # bounds the memo on long-running processes; refilled on demand


class Segmenter:
    def __init__(self, vocab: Vocabulary) -> None:
        self._ids = vocab.ids
        self._max_len = max(map(len, vocab.ids))
        # Tags: every entry of 3+ characters that starts with '<'. They all end at their only '>' (checked here),
        # so the one that can match at a position is the text up to the first '>'.
        self._tags = {spelling: i for spelling, i in vocab.ids.items() if spelling[:1] == "<" and len(spelling) > 2}
        for spelling in self._tags:
            if not spelling.endswith(">") or ">" in spelling[:-1]:
                raise ValueError(f"vocab.txt entry {spelling!r} starts with '<' but is not a '<...>' tag with a single "
                                 f"closing '>'; this tokenizer cannot match it")
        self._kigou_id = vocab.require_id("<KIGOU>")
        self._u2000_id = vocab.require_id("<U2000U2BFF>")
        unk_id = vocab.require_id("<|endoftext|>")
        self._id_of_byte = tuple(self._ids.get(f"<|byte{b}|>", unk_id) for b in range(256))
        # window -> id * 4 + characters consumed, or -1 when the character falls back to several byte ids
        self._windows: dict[str, int] = {}
        self._byte_fallbacks: dict[str, list[int]] = {}

    def __call__(self, text: str, out: list[int]) -> None:
        """Appends the ids of text (already rewritten: whitespace tags, emoji tags, cleaning) to out."""
        windows = self._windows
        if len(windows) > _MAX_CACHED_WINDOWS:
            windows.clear()
        tags = self._tags
        max_len = self._max_len
        append = out.append
        pos, end = 0, len(text)
        while pos < end:
            if text[pos] == "<":
                close = text.find(">", pos + 2, pos + max_len)
                if close != -1:
                    tag_id = tags.get(text[pos:close + 1])
                    if tag_id is not None:
                        append(tag_id)
                        pos = close + 1
                        continue
                window = text[pos:pos + 2]  # tags excluded, '<' competes with 2-character entries only
            else:
                window = text[pos:pos + 3]
            packed = windows.get(window)
            if packed is None:
                packed = windows[window] = self._decide(window)
            if packed >= 0:
                append(packed >> 2)
                pos += packed & 3
            else:
                out += self._byte_fallbacks[text[pos]]
                pos += 1

    def _decide(self, window: str) -> int:
        ids = self._ids
        best_len, best_id = 0, -1
        for length in range(len(window), 0, -1):  # longest first: on equal ids the longer entry wins
            token_id = ids.get(window[:length])
            if token_id is not None and (best_len == 0 or token_id < best_id):
                best_len, best_id = length, token_id
        if best_len:
            return best_id * 4 + best_len
        fallback = self._fallback(window[0])
        if len(fallback) == 1:
            return fallback[0] * 4 + 1
        self._byte_fallbacks[window[0]] = fallback
        return -1

    def _fallback(self, ch: str) -> list[int]:
        code = ord(ch)
        if 0xA1 <= code <= 0xBF or 0x1C0 <= code <= 0x1C3 or 0x2B9 <= code <= 0x362:
            return [self._kigou_id]
        if 0x2000 <= code <= 0x2BFF:
            return [self._u2000_id]
        try:
            encoded = ch.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"text holds the lone surrogate U+{code:04X}, which has no UTF-8 encoding; pass valid "
                             f"Unicode text") from None
        return [self._id_of_byte[b] for b in encoded]
