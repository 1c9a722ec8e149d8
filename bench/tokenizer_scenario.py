"""Tokenizer throughput: hayabusa.tokenizer against transformers' GPTNeoXJapaneseTokenizer on the same lines."""

from __future__ import annotations

from pathlib import Path

import torch

from hayabusa.bench.records import BenchRecord
from hayabusa.bench.runners import EngineUnavailable
from hayabusa.bench.timing import median, time_ms
from hayabusa.bench.workloads import SuiteSizes

# Written for this benchmark: everyday prose with the things the tokenizer treats specially (numbers, dates,
# prices, ASCII words, URLs, e-mail addresses, emoji, symbols, full-width and half-width forms).
SAMPLE_LINES = (
    "今日は朝から雨が降っていたので、駅まで歩く代わりにバスに乗ることにした。",
    "新しいモデルの学習には約3週間かかり、電気代は予想より20%ほど高くなった。",
    "会議は2024年4月1日の午前10時30分から、本社の第2会議室で行われます。",
    "このノートパソコンは税込み128,000円で、重さはわずか1.1kgしかない。",
    "詳しい手順は https://example.com/docs/setup に載っているので、先に読んでください。",
    "質問があれば support@example.jp までメールを送ってもらえれば、翌営業日に返信します😊",
    "東京から大阪までは新幹線でおよそ2時間半、飛行機なら1時間ほどで着く。",
    "ＧＰＵのメモリが足りないときは、バッチサイズを半分にしてもう一度試してみよう。",
    "「吾輩は猫である」の書き出しは、日本語を学ぶ人なら一度は目にしたことがあるだろう。",
    "Pythonで書いたスクリプトをcronで毎晩3時に動かし、結果をSlackに通知している。",
    "春になると川沿いの桜並木が満開になり、週末は花見客でたいへんにぎわう。",
    "電話番号は03-1234-5678です。受付時間は平日の9:00〜17:00となっております。",
)


def sample_texts(num_chars: int) -> list[str]:
    """Lines cycled from SAMPLE_LINES until they hold at least num_chars characters."""
    texts, total = [], 0
    while total < num_chars:
        line = SAMPLE_LINES[len(texts) % len(SAMPLE_LINES)]
        texts.append(line)
        total += len(line)
    return texts


def load_tokenizer(engine: str, model_dir: Path):
    """encode(text) -> ids / decode(ids) -> text of hayabusa ("hayabusa") or transformers ("transformers-eager")."""
    if engine == "hayabusa":
        try:
            from hayabusa.tokenizer import Tokenizer
        except ImportError as err:
            raise EngineUnavailable(f"hayabusa.tokenizer is not importable: {err}") from None
        return Tokenizer.from_pretrained(str(model_dir))
    if engine == "transformers-eager":
        try:
            from transformers import GPTNeoXJapaneseTokenizer
        except ImportError as err:
            raise EngineUnavailable(f"transformers is not installed ({err}); pip install \"hayabusa[bench]\"") from None
        return GPTNeoXJapaneseTokenizer.from_pretrained(str(model_dir))
    raise EngineUnavailable(f"{engine} has no tokenizer of its own")


def run_tokenizer(engine: str, model_dir: Path, sizes: SuiteSizes) -> list[BenchRecord]:
    """Encode every line, then decode every line's ids; tokens_per_s counts the tokens produced / consumed."""
    tokenizer = load_tokenizer(engine, model_dir)
    texts = sample_texts(sizes.tokenizer_chars)
    chars = sum(len(t) for t in texts)
    cpu = torch.device("cpu")
    ids = [tokenizer.encode(t) for t in texts]
    tokens = sum(len(i) for i in ids)
    records = []
    for case, fn in (("encode", lambda: [tokenizer.encode(t) for t in texts]),
                     ("decode", lambda: [tokenizer.decode(i) for i in ids])):
        timing = time_ms(fn, cpu, sizes.repeats, sizes.warmup)
        ms = median(timing.samples_ms)
        records.append(BenchRecord(engine, "tokenizer", case, len(texts), None, None, None, ms, tokens * 1e3 / ms,
                                   None, None, sizes.repeats, timing.samples_ms, timing.warmup_ms,
                                   {"chars": chars, "tokens": tokens, "chars_per_s": chars * 1e3 / ms}))
    return records
