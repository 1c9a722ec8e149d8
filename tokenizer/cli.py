"""`hayabusa tokenize "テキスト" [--model MODEL] [--clean]`: print the ids and the vocabulary piece of each."""

from __future__ import annotations

import argparse
import json

from hayabusa.engine.cli import command_line_text
from hayabusa.engine.loading.model_source import add_model_arguments

from .tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", type=command_line_text, help="text to tokenize")
    add_model_arguments(parser, required=False,
                        model_help="whose vocab.txt + emoji.json to use: a model directory, a Hub repo id (only those "
                                   "two files are fetched) or a random preset (tiny, small, 2.7b: the vendored "
                                   "vocabulary); default: the vendored GPT-NeoX-Japanese vocabulary")
    parser.add_argument("--clean", action="store_true",
                        help="replace URLs, e-mail addresses, phone numbers, dates and prices by tags first "
                             "(transformers' do_clean_text)")


def run(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.from_pretrained(args.model, revision=args.revision)
    ids = tokenizer.encode(args.text, clean=args.clean)
    print(f"{len(ids)} tokens")
    print(json.dumps(ids))
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        print(f"{token_id:>6}  {piece}")
    return 0
