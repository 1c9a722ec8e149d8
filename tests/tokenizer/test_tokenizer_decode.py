"""Decoding beyond transformers: byte runs joined into UTF-8, round trips, and the streaming decoder."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hayabusa.tokenizer import StreamDecoder, Tokenizer
from hayabusa.tokenizer.vocab import VENDORED_DIR

TOK = Tokenizer.from_pretrained()
BYTE_IDS = sorted(i for i in range(TOK.vocab_size) if TOK.byte_value(i) >= 0)
SPECIAL_IDS = TOK.all_special_ids


def _round_trip_alphabet() -> list[str]:
    """Characters that decode back to themselves in any combination: not part of a variant spelling (those decode
    to the line's first spelling), of an emoji key (classes) or of a tag ('<', '>'), and alone they round-trip."""
    lines = (VENDORED_DIR / "vocab.txt").read_text(encoding="utf-8").split("\n")
    variant_chars = {ch for line in lines for spelling in line.split(",")[1:] for ch in spelling}
    emoji = json.loads((VENDORED_DIR / "emoji.json").read_text(encoding="utf-8"))["emoji"]
    removed_first = set(" \u3000\r\n\t\u2014\u2212")  # keys holding these never match (spaces become <SP> first)
    emoji_chars = {ch for key in emoji if not removed_first & set(key) for ch in key}
    candidates = [*map(chr, range(0x20, 0x7F)), "\n", "\t", *map(chr, range(0x3041, 0x3097)),
                  *map(chr, range(0x30A1, 0x30FB)), *map(chr, range(0x4E00, 0xA000, 7)), *map(chr, range(0x391, 0x3CA)),
                  *map(chr, range(0x410, 0x450)), *map(chr, range(0xAC00, 0xD7A4, 97)),
                  *map(chr, range(0x20000, 0x2A6E0, 101)), *map(chr, range(0x1F000, 0x1FB00, 13))]
    excluded = variant_chars | emoji_chars | {"<", ">"}
    return [ch for ch in candidates if ch not in excluded and TOK.decode(TOK.encode(ch)) == ch]


ROUND_TRIP_ALPHABET = _round_trip_alphabet()
BYTE_FALLBACK_CHARS = [ch for ch in ROUND_TRIP_ALPHABET if all(TOK.byte_value(i) >= 0 for i in TOK.encode(ch))
                       and len(ch.encode()) > 1]
ROUND_TRIP_TEXT = st.lists(st.one_of(st.sampled_from(ROUND_TRIP_ALPHABET), st.sampled_from(BYTE_FALLBACK_CHARS)),
                           max_size=40).map("".join)


def test_alphabets_cover_the_interesting_cases():
    assert len(ROUND_TRIP_ALPHABET) > 2000
    assert len(BYTE_FALLBACK_CHARS) > 100  # e.g. Hangul, CJK extension B, emoji outside emoji.json
    assert {"a", "\n", "\t", " ", "あ", "ア", ","} <= set(ROUND_TRIP_ALPHABET)


def test_byte_fallback_characters_decode_back():
    text = "한국어とハングル" + "".join(BYTE_FALLBACK_CHARS[:20])
    ids = TOK.encode(text)
    assert sum(TOK.byte_value(i) >= 0 for i in ids) >= 3 * 20
    assert TOK.decode(ids) == text


def test_invalid_byte_runs_become_replacement_characters_like_utf8_decoding():
    byte_id = {TOK.byte_value(i): i for i in BYTE_IDS}
    raw = bytes([0xE3, 0x81, 0x41, 0xFF - 1, 0xE3, 0x81, 0x82, 0x80])
    ids = [byte_id[b] for b in raw]
    assert TOK.decode(ids) == raw.decode("utf-8", errors="replace") == "\ufffdA\ufffdあ\ufffd"
    # a non-byte token ends a run: an unfinished character before it is one U+FFFD
    assert TOK.decode([byte_id[0xE3], byte_id[0x81], TOK.encode("x")[0], byte_id[0x82]]) == "\ufffdx\ufffd"


def test_class_tokens_decode_to_transformers_representatives():
    assert TOK.decode(TOK.encode(" \u3000\r\n\t")) == "  \n\t"
    assert TOK.decode(TOK.encode("😀🐯")) == "😀🐯"  # representatives of <|emoji1|> and <|emoji4|>
    assert TOK.decode(TOK.encode("😃")) == "😀"
    assert TOK.decode(TOK.encode("¡ǀʹ\u2003")) == "ǀǀǀ‖"  # <KIGOU> x3, <U2000U2BFF>
    assert TOK.decode(TOK.encode("─━", clean=True)) == "▀"  # <BLOCK>
    assert TOK.decode(TOK.encode("  x ")) == "  x "
    assert TOK.decode(TOK.encode("  x "), strip=True) == "x"


@settings(max_examples=300, deadline=None)
@given(text=ROUND_TRIP_TEXT)
def test_decode_encode_round_trips(text):
    assert TOK.decode(TOK.encode(text)) == text


def _stream(ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = StreamDecoder(TOK, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=300, deadline=None)
@given(text=ROUND_TRIP_TEXT)
def test_stream_deltas_never_split_a_character(text):
    ids = TOK.encode(text)
    deltas = _stream(ids)
    assert "".join(deltas) == TOK.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # an unfinished character is held back, never written broken
    assert deltas[-1] == ""  # valid text leaves nothing held back


ANY_IDS = st.lists(st.one_of(st.integers(0, TOK.vocab_size - 1), st.sampled_from(BYTE_IDS),
                             st.sampled_from(SPECIAL_IDS)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ids=ANY_IDS, skip=st.booleans())
def test_stream_deltas_concatenate_to_decode_for_any_ids(ids, skip):
    assert "".join(_stream(ids, skip)) == TOK.decode(ids, skip_special_tokens=skip)


def test_stream_holds_back_multibyte_characters():
    ids = TOK.encode("한x")
    assert len(ids) == 4  # three bytes and 'x'
    assert _stream(ids) == ["", "", "한", "x", ""]
    unfinished = StreamDecoder(TOK)
    assert [unfinished.push(i) for i in ids[:2]] == ["", ""]
    assert unfinished.flush() == "\ufffd" == TOK.decode(ids[:2])


def test_stream_rejects_bad_ids():
    decoder = StreamDecoder(TOK)
    for bad in (-1, TOK.vocab_size, 3.0, "5", None):
        with pytest.raises(ValueError, match="token_id"):
            decoder.push(bad)
