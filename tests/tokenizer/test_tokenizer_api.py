"""The HF-shaped interface: batches, padding, tensors, loading from directories / the Hub, errors, and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hayabusa.engine.cli import main
from hayabusa.tokenizer import GPTNeoXJapaneseTokenizer, Tokenizer, hub
from hayabusa.tokenizer.vocab import VENDORED_DIR


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained()


@pytest.fixture
def vocab_dir(tmp_path):
    for name in ("vocab.txt", "emoji.json"):
        shutil.copy(VENDORED_DIR / name, tmp_path / name)
    return tmp_path


TEXTS = ["吾輩は猫である", "こんにちは、世界！ Hello", "あ"]


def test_call_on_one_text_gives_flat_lists(tok):
    encoding = tok(TEXTS[0])
    assert encoding["input_ids"] == encoding.input_ids == tok.encode(TEXTS[0])
    assert encoding["attention_mask"] == [1] * len(encoding.input_ids)
    assert "attention_mask" not in tok(TEXTS[0], return_attention_mask=False)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_and_attention_mask(tok, side):
    encoding = tok(TEXTS, padding=True, padding_side=side)
    lengths = [len(tok.encode(t)) for t in TEXTS]
    width = max(lengths)
    for text, ids, mask, length in zip(TEXTS, encoding.input_ids, encoding.attention_mask, lengths, strict=True):
        assert len(ids) == len(mask) == width
        pad = [tok.pad_token_id] * (width - length)
        real = tok.encode(text)
        assert ids == (real + pad if side == "right" else pad + real)
        ones, zeros = [1] * length, [0] * (width - length)
        assert mask == (ones + zeros if side == "right" else zeros + ones)


def test_return_tensors_pt(tok):
    encoding = tok(TEXTS, padding="longest", return_tensors="pt")
    width = max(len(tok.encode(t)) for t in TEXTS)
    assert encoding.input_ids.shape == encoding.attention_mask.shape == (3, width)
    assert encoding.input_ids.dtype == encoding.attention_mask.dtype == torch.long
    assert tok.batch_decode(encoding.input_ids, skip_special_tokens=True) == TEXTS  # pads are eos: skipped
    assert encoding.to("cpu").input_ids.equal(encoding.input_ids)
    single = tok(TEXTS[0], return_tensors="pt")
    assert single.input_ids.tolist() == [tok.encode(TEXTS[0])]
    with pytest.raises(ValueError, match="padding=True"):
        tok(TEXTS, return_tensors="pt")


def test_max_length_padding_and_truncation(tok):
    encoding = tok(TEXTS, padding="max_length", max_length=12)
    assert all(len(ids) == 12 for ids in encoding.input_ids)
    truncated = tok(TEXTS, truncation=True, max_length=3)
    assert truncated.input_ids == [tok.encode(t)[:3] for t in TEXTS]
    assert truncated.attention_mask == [[1] * len(ids) for ids in truncated.input_ids]


@pytest.mark.parametrize("kwargs, match", [
    ({"padding": "longer"}, "padding"),
    ({"padding_side": "middle"}, "padding_side"),
    ({"return_tensors": "np"}, "return_tensors"),
    ({"truncation": True}, "max_length"),
    ({"padding": "max_length"}, "max_length"),
    ({"max_length": 0, "truncation": True}, "max_length"),
])
def test_call_rejects_bad_options(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tok(TEXTS, **kwargs)


@pytest.mark.parametrize("bad", [123, b"bytes", None, ["ok", 5], [], ("ok", None)])
def test_non_str_text_is_rejected(tok, bad):
    with pytest.raises(TypeError, match="str"):
        tok(bad)
    if not isinstance(bad, (list, tuple)):
        with pytest.raises(TypeError, match="str"):
            tok.encode(bad)


def test_lone_surrogate_is_rejected(tok):
    with pytest.raises(ValueError, match="U\\+D83D"):
        tok.encode("abc\ud83d")


@pytest.mark.parametrize("bad, error, match", [
    ([1, -1], ValueError, r"ids\[1\] = -1"),
    ([32000], ValueError, r"outside the vocabulary \[0, 32000\)"),
    ([1, 2.0], TypeError, r"ids\[1\]"),
    (["a"], TypeError, r"ids\[0\]"),
    ([True], TypeError, r"ids\[0\]"),
    ("abc", TypeError, "sequence of ints"),
    (None, TypeError, "sequence of ints"),
])
def test_decode_rejects_invalid_ids(tok, bad, error, match):
    with pytest.raises(error, match=match):
        tok.decode(bad)
    with pytest.raises(error, match=match):
        tok.convert_ids_to_tokens(bad)


def test_decode_accepts_lists_tuples_tensors_and_ints(tok):
    ids = tok.encode("猫である")
    text = tok.decode(ids)
    assert text == "猫である"
    assert tok.decode(tuple(ids)) == tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids[0]) == tok.decode(torch.tensor(ids[0])) == "猫"
    assert tok.batch_decode(torch.tensor([ids, ids])) == [text, text]


def test_skip_special_tokens(tok):
    ids = [tok.bos_token_id, *tok.encode("猫"), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "<|startoftext|>猫<|endoftext|><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "猫"
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == ["猫"]
    assert tok.encode("<|startoftext|>猫<|endoftext|>") == ids[:-1]


def test_tokens_and_ids(tok):
    ids = tok.encode("慶應 x")
    assert tok.convert_ids_to_tokens(ids) == tok.tokenize("慶應 x") == ["慶応", "<SP>", "x"]
    assert tok.convert_ids_to_tokens(ids[0]) == "慶応"
    assert tok.convert_tokens_to_ids(["慶應", "慶応", "<SP>", "no such piece"]) == [ids[0], ids[0], ids[1],
                                                                                     tok.unk_token_id]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.eos_token_id


def test_transformers_style_construction(vocab_dir):
    tokenizer = GPTNeoXJapaneseTokenizer(vocab_file=vocab_dir / "vocab.txt", emoji_file=vocab_dir / "emoji.json")
    assert GPTNeoXJapaneseTokenizer is Tokenizer
    assert tokenizer.encode("吾輩は猫である") == Tokenizer.from_pretrained().encode("吾輩は猫である")


def test_from_pretrained_directory(vocab_dir, tok):
    assert Tokenizer.from_pretrained(str(vocab_dir)).encode("慶應大学😊") == tok.encode("慶應大学😊")


def test_from_pretrained_hub_id_downloads_only_the_two_files(monkeypatch, tok):
    requests = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        requests.append((repo_id, revision, allow_patterns, local_files_only))
        return str(VENDORED_DIR)

    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    tokenizer = Tokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b", revision="main")
    assert requests == [("abeja/gpt-neox-japanese-2.7b", "main", ["vocab.txt", "emoji.json"], False)]
    assert tokenizer.encode("猫") == tok.encode("猫")


def test_from_pretrained_takes_every_model_source(tok):
    """A random preset (not a Hub id) gives the vocabulary its checkpoint is written with, without writing it."""
    for preset in ("tiny", "small", "2.7b"):
        assert Tokenizer.from_pretrained(preset).encode("猫である") == tok.encode("猫である")


@pytest.mark.parametrize("name", ["./no/such/dir", "not a hub id!", "tinyy"])
def test_from_pretrained_bad_names(name):
    with pytest.raises(FileNotFoundError, match="not a local directory, a random preset .* or a Hub repo id"):
        Tokenizer.from_pretrained(name)


def test_from_pretrained_file_instead_of_directory(vocab_dir):
    with pytest.raises(FileNotFoundError, match="is a file"):
        Tokenizer.from_pretrained(str(vocab_dir / "vocab.txt"))


@pytest.mark.parametrize("missing", ["vocab.txt", "emoji.json"])
def test_missing_vocab_files(vocab_dir, missing):
    (vocab_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        Tokenizer.from_pretrained(str(vocab_dir))


@pytest.mark.parametrize("name, content, match", [
    ("vocab.txt", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("vocab.txt", b"", "empty"),
    ("vocab.txt", "あ\nい\n<SP>\n".encode(), "has no entry '<\\|startoftext\\|>'"),
    ("emoji.json", b"{not json", "not valid UTF-8 JSON"),
    ("emoji.json", json.dumps({"emoji": {}}).encode(), "'emoji_inv'"),
    ("emoji.json", json.dumps({"emoji": {"x": 3}, "emoji_inv": {}}).encode(), "expected a non-empty key and a string"),
])
def test_corrupt_vocab_files(vocab_dir, name, content, match):
    (vocab_dir / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(str(vocab_dir))


def test_vocab_without_emoji_representative(vocab_dir):
    table = json.loads((vocab_dir / "emoji.json").read_text(encoding="utf-8"))
    del table["emoji_inv"]["<|emoji3|>"]
    (vocab_dir / "emoji.json").write_text(json.dumps(table), encoding="utf-8")
    with pytest.raises(ValueError, match="<\\|emoji3\\|>"):
        Tokenizer.from_pretrained(str(vocab_dir))


def test_small_emoji_table(vocab_dir):
    table = json.loads((vocab_dir / "emoji.json").read_text(encoding="utf-8"))
    table["emoji"] = {"(^_^)": "<|emoji1|>", "^_^": "<|emoji2|>"}  # only common-character anchors
    (vocab_dir / "emoji.json").write_text(json.dumps(table), encoding="utf-8")
    tokenizer = Tokenizer.from_pretrained(str(vocab_dir))
    emoji1, emoji2 = tokenizer.convert_tokens_to_ids(["<|emoji1|>", "<|emoji2|>"])
    for text in ("(^_^) ^_^😀", "x" * 300 + "(^_^) ^_^😀"):  # short texts and long ones find anchors differently
        ids = tokenizer.encode(text)
        assert ids.count(emoji1) == ids.count(emoji2) == 1


def test_vocab_with_an_unclosed_tag(vocab_dir):
    with open(vocab_dir / "vocab.txt", "a", encoding="utf-8") as vocab:
        vocab.write("\n<half")
    with pytest.raises(ValueError, match="'<half'"):
        Tokenizer.from_pretrained(str(vocab_dir))


def _run_cli(*argv: str) -> int:
    return main(["tokenize", *argv])


def test_cli_prints_ids_and_pieces(capsys, tok):
    assert _run_cli("慶應 x") == 0
    lines = capsys.readouterr().out.splitlines()
    ids = tok.encode("慶應 x")
    assert lines[0] == f"{len(ids)} tokens"
    assert json.loads(lines[1]) == ids
    assert [line.split() for line in lines[2:]] == [[str(i), p] for i, p in zip(ids, ["慶応", "<SP>", "x"],
                                                                                  strict=True)]


def test_cli_clean_and_model(capsys, vocab_dir, tok):
    assert _run_cli("https://example.com", "--clean", "--model", str(vocab_dir)) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[1]) == tok.encode("<URL>") and "<URL>" in out
    assert _run_cli("x", "--model", str(vocab_dir / "nope")) == 1
    assert capsys.readouterr().err.startswith(f"hayabusa tokenize: error: model '{vocab_dir / 'nope'}' is not a local")
