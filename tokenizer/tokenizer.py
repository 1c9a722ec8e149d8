"""GPT-NeoX-Japanese tokenizer: transformers' `GPTNeoXJapaneseTokenizer` ids, several times faster, no transformers.

Encoding gives transformers' ids on every input (tested against it). Pipeline per piece of text between the
special tokens `<|startoftext|>` / `<|endoftext|>` (which map straight to their ids, as transformers' added-token
split does): whitespace and dash folding, emoji classes, optional cleaning, sub-word segmentation.

Differences from transformers, all on the decoding / interface side:
  - decode joins runs of `<|byteN|>` tokens and decodes them as UTF-8, so characters that fell back to bytes
    come back (transformers decodes each byte alone and writes U+FFFD for every byte of a multi-byte character);
    an invalid byte run still becomes U+FFFD;
  - decode does not strip surrounding whitespace (transformers calls `.strip()`); pass `strip=True` for that;
  - convert_ids_to_tokens / tokenize give vocabulary pieces (`<SP>`, `<|byte227|>`, the first spelling of a
    variant line), not transformers' decoded text per token (`" "`, `"\ufffd"`);
  - vocab_size and len() count ids (32000); transformers counts distinct vocab lines (31998, two lines repeat);
  - the `__call__` options are the subset below (no pairs, no offsets, no token_type_ids).
Kept from transformers: class tokens decode to one representative (`<SP>` -> " ", `<BR>` -> "\n", `<TAB>` -> "\t",
`<|emojiN|>` -> its emoji, `<BLOCK>` -> "▀", `<KIGOU>` -> "ǀ", `<U2000U2BFF>` -> "‖"), variants to their first
spelling, skip_special_tokens drops bos/eos(=pad=unk) only, and the id of the vocabulary line "," decodes to "".
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from .clean import clean_text
from .normalize import EmojiReplacer, fold_whitespace
from .segment import Segmenter
from .vocab import load_vocabulary, resolve_vocab_files

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also pad and unk, as in the model's tokenizer_config
_CLASS_TOKEN_TEXT = {"<SP>": " ", "<BR>": "\n", "<TAB>": "\t", "<BLOCK>": "\u2580", "<KIGOU>": "\u01c0",
                     "<U2000U2BFF>": "\u2016"}


class BatchEncoding(dict):
    """{"input_ids": ..., "attention_mask": ...}; keys are also attributes, `.to(device)` moves tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class Tokenizer:
    def __init__(self, vocab_file: str | os.PathLike, emoji_file: str | os.PathLike, *,
                 do_clean_text: bool = False) -> None:
        vocab = load_vocabulary(vocab_file, emoji_file)
        self.do_clean_text = do_clean_text
        self._spellings = vocab.spellings
        self._ids = vocab.ids
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = BOS_TOKEN, EOS_TOKEN, EOS_TOKEN, EOS_TOKEN
        self.bos_token_id = vocab.require_id(BOS_TOKEN)
        self.eos_token_id = self.pad_token_id = self.unk_token_id = vocab.require_id(EOS_TOKEN)
        self.all_special_ids = sorted({self.bos_token_id, self.eos_token_id})
        self._special_id_set = frozenset(self.all_special_ids)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in (BOS_TOKEN, EOS_TOKEN)) + ")")
        self._replace_emoji = EmojiReplacer(vocab.emoji)
        self._segment = Segmenter(vocab)
        # Decoding tables: id -> text written for it, and id -> byte value for <|byteN|> (-1 for other tokens).
        self._texts: list[str] = []
        self._byte_values: list[int] = []
        for variants in vocab.spellings:
            piece = variants[0]
            byte_value = -1
            if piece.startswith("<|byte") and piece.endswith("|>"):
                byte_value = _parse_byte(piece)
                text = ""
            elif piece.startswith("<|emoji") and piece.endswith("|>"):
                if piece not in vocab.emoji_inv:
                    raise ValueError(f"emoji.json 'emoji_inv' has no emoji for the vocabulary's {piece!r}")
                text = vocab.emoji_inv[piece]
            else:
                text = _CLASS_TOKEN_TEXT.get(piece, piece)
            self._texts.append(text)
            self._byte_values.append(byte_value)
        self._byte_ids = frozenset(i for i, value in enumerate(self._byte_values) if value >= 0)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, *, do_clean_text: bool = False,
                        revision: str | None = None) -> Tokenizer:
        """None: the vendored vocabulary; else the vocab.txt + emoji.json of a model directory, a random preset
        (tiny, small, 2.7b: the vendored vocabulary) or a Hub repo id (downloads just those two files, or uses the
        Hub cache; offline, fails within seconds with the `hf download` command to run)."""
        vocab_file, emoji_file = resolve_vocab_files(model, revision)
        return cls(vocab_file, emoji_file, do_clean_text=do_clean_text)

    @property
    def vocab_size(self) -> int:
        return len(self._spellings)

    def __len__(self) -> int:
        return len(self._spellings)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, do_clean_text={self.do_clean_text})"

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, *, clean: bool | None = None) -> list[int]:
        """Ids of text; clean (default: do_clean_text) replaces URLs, e-mails, phones, dates, prices by tags."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        do_clean = self.do_clean_text if clean is None else clean
        ids: list[int] = []
        if "<|" not in text:
            self._encode_piece(text, do_clean, ids)
            return ids
        for index, piece in enumerate(self._special_split.split(text)):
            if index % 2:  # the split keeps the special tokens at odd indices
                ids.append(self._ids[piece])
            elif piece:
                self._encode_piece(piece, do_clean, ids)
        return ids

    def _encode_piece(self, text: str, do_clean: bool, out: list[int]) -> None:
        text = self._replace_emoji(fold_whitespace(text))
        if do_clean:
            text = clean_text(text)
        self._segment(text, out)

    def tokenize(self, text: str, *, clean: bool | None = None) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, clean=clean))

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, padding_side: str = "right", return_tensors: str | None = None,
                 return_attention_mask: bool = True, clean: bool | None = None) -> BatchEncoding:
        """HF-style encoding of one text or a batch.

        padding: False / "do_not_pad", True / "longest", or "max_length" (needs max_length); pads with pad_token_id
        on padding_side ("right" or "left", the latter for batched generation). truncation=True cuts each sequence
        to max_length tokens (from the right). return_tensors="pt" gives LongTensors [batch, seq] (a single text
        gets batch 1), else lists (a single text gives a flat list).
        """
        single = isinstance(text, str)
        texts = [text] if single else _check_texts(text)
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation=True and padding='max_length' need max_length")
        sequences = [self.encode(t, clean=clean) for t in texts]
        if truncation:
            sequences = [ids[:max_length] for ids in sequences]
        masks = [[1] * len(ids) for ids in sequences]
        if padding in (True, "longest", "max_length"):
            width = max(len(ids) for ids in sequences)
            if padding == "max_length":
                width = max(width, max_length)
            for ids, mask in zip(sequences, masks, strict=True):
                fill = width - len(ids)
                if padding_side == "right":
                    ids += [self.pad_token_id] * fill
                    mask += [0] * fill
                else:
                    ids[:0] = [self.pad_token_id] * fill
                    mask[:0] = [0] * fill
        if return_tensors == "pt":
            if len({len(ids) for ids in sequences}) > 1:
                raise ValueError("return_tensors='pt' needs sequences of one length: pass padding=True")
            import torch

            encoding = BatchEncoding(input_ids=torch.tensor(sequences, dtype=torch.long).reshape(len(texts), -1))
            if return_attention_mask:
                encoding["attention_mask"] = torch.tensor(masks, dtype=torch.long).reshape(len(texts), -1)
            return encoding
        encoding = BatchEncoding(input_ids=sequences[0] if single else sequences)
        if return_attention_mask:
            encoding["attention_mask"] = masks[0] if single else masks
        return encoding

    # ---- decoding -------------------------------------------------------------------------------------------
    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False, *, strip: bool = False) -> str:
        """Text of ids (list, tuple, 1-D tensor/array, or one int). strip=True strips it like transformers."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        texts, byte_values = self._texts, self._byte_values
        if self._byte_ids.isdisjoint(ids):
            text = "".join(map(texts.__getitem__, ids))
            return text.strip() if strip else text
        pieces: list[str] = []
        pending = bytearray()  # a run of <|byteN|> values, decoded together
        for token_id in ids:
            byte_value = byte_values[token_id]
            if byte_value >= 0:
                pending.append(byte_value)
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            pieces.append(texts[token_id])
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
        text = "".join(pieces)
        return text.strip() if strip else text

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False, *,
                     strip: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens, strip=strip) for ids in sequences]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Vocabulary pieces (first spelling of each id): one str for an int, else a list."""
        checked = self._check_ids(ids)
        if isinstance(ids, int):
            return self._spellings[checked[0]][0]
        skip = self._special_id_set if skip_special_tokens else frozenset()
        return [self._spellings[i][0] for i in checked if i not in skip]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of each piece (any variant spelling); unknown pieces give unk_token_id, as in transformers."""
        if isinstance(tokens, str):
            return self._ids.get(tokens, self.unk_token_id)
        return [self._ids.get(token, self.unk_token_id) for token in tokens]

    def byte_value(self, token_id: int) -> int:
        """The byte a `<|byteN|>` id stands for, -1 for any other id (used by StreamDecoder)."""
        return self._byte_values[token_id]

    def token_text(self, token_id: int) -> str:
        """What decode writes for one non-byte id."""
        return self._texts[token_id]

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensors, numpy arrays and scalars
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"ids must be an int or a sequence of ints, got {type(ids).__name__}")
        size = len(self._spellings)
        if ids and not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < size):
            _raise_for_first_bad_id(ids, size)
        return ids


def _raise_for_first_bad_id(ids: Sequence[Any], size: int) -> None:
    for position, token_id in enumerate(ids):
        if type(token_id) is not int:
            raise TypeError(f"ids[{position}] is {token_id!r} ({type(token_id).__name__}); ids must be ints")
        if not 0 <= token_id < size:
            raise ValueError(f"ids[{position}] = {token_id} is outside the vocabulary [0, {size})")


def _check_texts(texts: Any) -> list[str]:
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"text must be a str or a non-empty list of str, got {type(texts).__name__} {texts!r:.80}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text[{index}] must be a str, got {type(text).__name__}")
    return list(texts)


def _parse_byte(piece: str) -> int:
    digits = piece[len("<|byte"):-len("|>")]
    if not (digits.isascii() and digits.isdecimal()) or int(digits) > 255:
        raise ValueError(f"vocab.txt entry {piece!r} looks like a byte token but names no byte 0-255")
    return int(digits)
