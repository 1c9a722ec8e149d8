"""do_clean_text: the same spans as transformers' regexes, found without their quadratic retries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hayabusa.tokenizer.clean import clean_text
from hayabusa.tokenizer.vocab import VENDORED_DIR

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def oracle_clean_text():
    oracle = transformers.GPTNeoXJapaneseTokenizer(vocab_file=str(VENDORED_DIR / "vocab.txt"),
                                                   emoji_file=str(VENDORED_DIR / "emoji.json"))
    return oracle.subword_tokenizer.clean_text


def _text_over(*fragments: str):
    return st.lists(st.sampled_from(fragments), max_size=30).map("".join)


# One alphabet per pattern family, built from the characters the regexes branch on, plus a mix of all.
URL_TEXT = _text_over("http", "https", "ftp", "://", ":", "/", "a", "Z", "0", "-", ".", "~", "?", "=", "&", "%",
                      "#", "(", "'", "<SP>", "あ", "s")
EMAIL_TEXT = _text_over("a", "Z", "9", ".", "_", "+", "-", "@", "@@", "<SP>", "あ", ".jp", "x.y")
TEL_TEXT = _text_over("0", "1", "2", "3", "9", "(", ")", "-", "03", "1234", "5678", "０", "a")
DATE_TEXT = _text_over("1", "2", "0", "3", "9", "12", "2024", "/", "-", "年", "月", "日", "時", "分", ":", "(日)",
                       "(月)", "(土", "㈰", "㈯", "１", "令和", "平成", "㍻", "\u32ff", "明治", "x")
PRICE_TEXT = _text_over("1", "2", "0", ",", "1,000", ",000", "億", "万", "千", "円", "ドル", "ユーロ", "ド", "ル",
                        "ユー", "(税込)", "(税抜)", "+tax", "(税", "１", "٣", "x")
BLOCK_TEXT = _text_over("─", "━", "│", "▀", "█", "▟", "<BLOCK>", "<BLOCK", "BLOCK>", "<", ">", "a", "あ")
MIXED_TEXT = st.one_of(URL_TEXT, EMAIL_TEXT, TEL_TEXT, DATE_TEXT, PRICE_TEXT, BLOCK_TEXT).flatmap(
    lambda a: st.lists(st.sampled_from([a, "1", "年", "円", "@", "/", "http://", "─"]), max_size=4).map("".join))


@pytest.mark.parametrize("strategy", [URL_TEXT, EMAIL_TEXT, TEL_TEXT, DATE_TEXT, PRICE_TEXT, BLOCK_TEXT, MIXED_TEXT],
                         ids=["url", "email", "tel", "date", "price", "block", "mixed"])
def test_clean_text_matches_transformers(oracle_clean_text, strategy):
    @settings(max_examples=250, deadline=None)
    @given(text=strategy)
    def check(text):
        assert clean_text(text) == oracle_clean_text(text)

    check()


@pytest.mark.parametrize("text, expected", [
    ("詳細はhttps://example.com/a?b=1を参照", "詳細は<URL>を参照"),
    ("mail:taro.yamada+tag@mail.example.co.jp。", "mail:<EMAIL>。"),
    ("電話03-1234-5678まで", "電話<TEL>まで"),
    ("2024年4月1日(月)10時30分開始", "<DATE>時30分開始"),  # `\d{1,2}` is tried before `\d{1,2}時`
    ("令和6年12月31日まで", "令和6年<DATE>まで"),  # the month/day pattern runs first and takes 12月31日
    ("1億2千万円(税込)と3千ドルと12,800円+tax", "<PRICE>と<PRICE>と<PRICE>"),
    ("┌──┐▀▀x█", "<BLOCK>x<BLOCK>"),
])
def test_clean_text_examples(oracle_clean_text, text, expected):
    assert clean_text(text) == oracle_clean_text(text) == expected


# Inputs on which transformers' regexes retry from every position of a long run and rescan it (quadratic: 20,000
# digits take about 25 s in its price regex). These must simply finish within an ordinary test run; the expected
# outputs pin down that the spans are still found.
HOSTILE_SIZE = 200_000


@pytest.mark.parametrize("text, expected", [
    ("１" * HOSTILE_SIZE + "円", "<PRICE>"),  # full-width digits: `\d` in the price loops, not `[0-9]` of TEL
    ("１" * HOSTILE_SIZE + "x", "１" * HOSTILE_SIZE + "x"),
    ("1" * HOSTILE_SIZE + "x", "<TEL>" * (HOSTILE_SIZE // 12 + 1) + "x"),  # 12-digit bites, then the last 8
    ("千億" * (HOSTILE_SIZE // 2) + "円", "千億" * (HOSTILE_SIZE // 2 - 1) + "千<PRICE>"),
    ("1,000" * (HOSTILE_SIZE // 5) + "x", "1,000" * (HOSTILE_SIZE // 5) + "x"),
    ("a" * HOSTILE_SIZE + "x", "a" * HOSTILE_SIZE + "x"),
    ("a" * HOSTILE_SIZE + "@example.jp", "<EMAIL>"),
    ("2000/" * (HOSTILE_SIZE // 5) + "x", "2000/" * (HOSTILE_SIZE // 5) + "x"),
    ("2000/" * (HOSTILE_SIZE // 5) + "12/1", "<DATE>"),
    ("1/" * (HOSTILE_SIZE // 2), "<DATE>/" * (HOSTILE_SIZE // 4)),
    ("(1" * (HOSTILE_SIZE // 2), "(1" * (HOSTILE_SIZE // 2)),
    ("http:" * (HOSTILE_SIZE // 5), "http:" * (HOSTILE_SIZE // 5)),
], ids=["digits-price", "digits", "tel-digits", "marks-price", "grouped-digits", "letters", "long-email", "years",
        "years-date", "months", "parens", "schemes"])
def test_clean_text_is_linear_on_hostile_input(text, expected):
    assert clean_text(text) == expected
