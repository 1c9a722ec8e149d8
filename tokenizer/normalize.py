"""Text rewriting before segmentation: whitespace and dash folding, then emoji/emoticon class tags.

Both steps are plain string replacements applied in a fixed order, exactly as transformers applies them, so the
rewritten text (and with it every id) is the same. Emoji replacement is the slow part there: it tests each of
the ~4,300 emoji.json keys against the text. Here each key is filed under one "anchor" character it contains,
and only keys whose anchor occurs in the text are tested, still in emoji.json order.
"""

from __future__ import annotations

import re
import unicodedata

# (old, new) in the order they are applied; "\r\n" must go before "\n" and "\r".
WHITESPACE_REPLACEMENTS = (
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("\u2014", "\u30fc"),  # em dash -> katakana prolonged sound mark
    ("\u2212", "\u30fc"),  # minus sign -> katakana prolonged sound mark
)
# Characters the whitespace step removes: an emoji key holding one can never match (e.g. kaomoji with spaces).
_REMOVED_CHARS = frozenset(" \u3000\r\n\t\u2014\u2212")
_SHORT_TEXT = 256  # below this many characters set(text) is cheaper than a regex scan for anchors


def fold_whitespace(text: str) -> str:
    for old, new in WHITESPACE_REPLACEMENTS:
        text = text.replace(old, new)
    return text


class EmojiReplacer:
    """Replaces every emoji.json key by its class token, key by key in file order (later keys see earlier output)."""

    def __init__(self, emoji: dict[str, str]) -> None:
        self._pairs = [(key, tag) for key, tag in emoji.items() if not _REMOVED_CHARS.intersection(key)]
        # Replacements only ever add characters of the tags; a key anchored on one of those must always be tested.
        tag_chars = frozenset("".join(emoji.values()))
        keys_per_char: dict[str, int] = {}
        for key, _ in self._pairs:
            for ch in set(key):
                keys_per_char[ch] = keys_per_char.get(ch, 0) + 1
        self._by_anchor: dict[str, list[int]] = {}
        self._always: list[int] = []
        for index, (key, _) in enumerate(self._pairs):
            choices = [ch for ch in set(key) if ch not in tag_chars]
            if not choices:
                self._always.append(index)
                continue
            anchor = min(choices, key=lambda ch: (_commonness(ch), keys_per_char[ch], ch))
            self._by_anchor.setdefault(anchor, []).append(index)
        # In long texts, rare anchors (symbols, emoji) are found by one regex scan that seldom matches; the few
        # common ones (ASCII, kana, ...) would match all the time, so each is probed with `in` instead.
        # Astral characters go through one range: sre only has a fast bitmap class for the BMP.
        self._probed_anchors = sorted(ch for ch in self._by_anchor if _commonness(ch) > 0)
        rare_bmp = "".join(re.escape(ch) for ch in sorted(self._by_anchor)
                           if _commonness(ch) == 0 and ord(ch) <= 0xFFFF)
        self._rare_anchor_scan = re.compile((f"[{rare_bmp}]|" if rare_bmp else "") + "[\U00010000-\U0010FFFF]")

    def __call__(self, text: str) -> str:
        if len(text) < _SHORT_TEXT:
            present = set(text)
        else:
            present = set(self._rare_anchor_scan.findall(text))
            present.update(ch for ch in self._probed_anchors if ch in text)
        by_anchor = self._by_anchor
        candidates = list(self._always)
        for ch in present:
            indices = by_anchor.get(ch)
            if indices is not None:
                candidates += indices
        if not candidates:
            return text
        candidates.sort()  # emoji.json order: a key may contain an earlier key's tag or overlap it
        pairs = self._pairs
        for index in candidates:
            key, tag = pairs[index]
            if key in text:
                text = text.replace(key, tag)
        return text


def _commonness(ch: str) -> int:
    """How often ch shows up in ordinary text (0 rare .. 3 common); anchors should be rare characters."""
    if ch.isascii():
        return 3 if ch.isalnum() else 2
    category = unicodedata.category(ch)
    if category in ("Lo", "Lm", "Nd") or "\uff00" <= ch <= "\uffef" or "\u3000" <= ch <= "\u303f":
        return 1  # kana, kanji, full/half-width forms, CJK punctuation
    return 0
