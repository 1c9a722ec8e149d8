"""Microbenchmark: hayabusa.tokenizer vs transformers' GPTNeoXJapaneseTokenizer encode (same ids) and decode.

`pytest bench/micro/test_bench_tokenizer.py --benchmark-only --benchmark-group-by=group` (CPU only). Groups:
a ~20-character prompt, a ~100k-character document (warm: the tokenizer has seen text before, its steady state;
cold: a freshly loaded tokenizer, so its per-window memo starts empty), and decoding the document's ids.
transformers is optional; its cases skip without it. chars/s and tokens/s go to each benchmark's extra_info.
"""

from __future__ import annotations

import pytest

from hayabusa.tokenizer import Tokenizer
from hayabusa.tokenizer.vocab import VENDORED_DIR

PROMPT = "人とAIが協調するためには、まず何が必要か"  # 21 characters

# Written for this benchmark: a mix of what Japanese documents hold (prose, dialogue, code, URLs, numbers, emoji).
PARAGRAPHS = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いて"
    "いた事だけは記憶している。",
    "「おはようございます！今日はいい天気ですね😊」と彼女は言った。「ええ、でも午後から雨らしいですよ☔」",
    "詳しい手順は https://example.com/docs/setup に載っています。質問は support@example.jp までどうぞ。",
    "def encode(self, text: str) -> list[int]:\n    ids = []\n    for piece in text.split():\n"
    "        ids.append(len(piece))\n    return ids\n",
    "ＧＰＵのメモリが足りないときは、バッチサイズを半分にしてもう一度試してみよう。価格は128,000円（税込）です。",
    "会議は2024年4月1日の午前10時30分から、本社の第2会議室で行われます。資料は前日までに共有してください。",
    "春になると川沿いの桜並木が満開になり、週末は花見客でたいへんにぎわう。屋台の焼きそばとたこ焼きが人気だ🍡🌸。",
    "東京から大阪までは新幹線でおよそ2時間半、飛行機なら1時間ほどで着く。ただし空港までの移動時間も考えておきたい。",
    "慶應義塾大学と早稲田大学の定期戦は、毎年多くの卒業生が観戦に訪れる伝統行事である。髙橋さんも𠮷田さんも来た。",
    "The quick brown fox jumps over the lazy dog. 日本語と English が混ざった文章もよくある (^_^)v",
)
PARAGRAPH = "\n".join(PARAGRAPHS) + "\n"
DOCUMENT = (PARAGRAPH * (100_000 // len(PARAGRAPH) + 1))[:100_000]


@pytest.fixture(scope="module")
def hayabusa_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_pretrained()
    tokenizer.encode(DOCUMENT)  # warm
    return tokenizer


@pytest.fixture(scope="module")
def transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.GPTNeoXJapaneseTokenizer(vocab_file=str(VENDORED_DIR / "vocab.txt"),
                                                 emoji_file=str(VENDORED_DIR / "emoji.json"))


def _record(benchmark, text: str, ids: list[int]) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the call ran once as a test, untimed
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(chars=len(text), tokens=len(ids), chars_per_s=len(text) / seconds,
                                tokens_per_s=len(ids) / seconds)


@pytest.mark.parametrize("impl", ["hayabusa", "transformers"])
@pytest.mark.parametrize("case", ["prompt", "document"])
def test_bench_encode(benchmark, request, hayabusa_tokenizer, impl, case):
    text = PROMPT if case == "prompt" else DOCUMENT
    tokenizer = request.getfixturevalue(f"{impl}_tokenizer")
    expected = hayabusa_tokenizer.encode(text)
    if impl == "transformers":
        assert tokenizer.encode(text) == expected, "hayabusa and transformers disagree on the ids"
    benchmark.group = f"encode {case} ({len(text)} chars)"
    if case == "document" and impl == "transformers":
        ids = benchmark.pedantic(tokenizer.encode, args=(text,), rounds=3, warmup_rounds=1)
    else:
        ids = benchmark(tokenizer.encode, text)
    assert ids == expected
    _record(benchmark, text, ids)


def test_bench_encode_document_cold(benchmark, hayabusa_tokenizer):
    benchmark.group = f"encode document ({len(DOCUMENT)} chars)"
    ids = benchmark.pedantic(lambda tokenizer: tokenizer.encode(DOCUMENT), rounds=5,
                             setup=lambda: ((Tokenizer.from_pretrained(),), {}))
    assert ids == hayabusa_tokenizer.encode(DOCUMENT)
    _record(benchmark, DOCUMENT, ids)


@pytest.mark.parametrize("impl", ["hayabusa", "transformers"])
def test_bench_decode_document(benchmark, request, hayabusa_tokenizer, impl):
    ids = hayabusa_tokenizer.encode(DOCUMENT)
    tokenizer = request.getfixturevalue(f"{impl}_tokenizer")
    benchmark.group = f"decode document ({len(ids)} ids)"
    text = benchmark(tokenizer.decode, ids)
    assert text.strip() == hayabusa_tokenizer.decode(ids, strip=True)
    _record(benchmark, text, ids)
