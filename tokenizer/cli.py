"""`hayabusa tokenize "テキスト" [--model DIR_OR_ID] [--clean]`: print the ids and the vocabulary piece of each."""

from __future__ import annotations

import argparse
import json
import sys

from .tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="text to tokenize")
    parser.add_argument("--model", default=None, metavar="DIR_OR_ID",
                        help="model directory or Hub id whose vocab.txt + emoji.json to use (default: the vendored "
                             "GPT-NeoX-Japanese vocabulary)")
    parser.add_argument("--clean", action="store_true",
                        help="replace URLs, e-mail addresses, phone numbers, dates and prices by tags first "
                             "(transformers' do_clean_text)")


def run(args: argparse.Namespace) -> int:
    try:
        tokenizer = Tokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        print(f"hayabusa tokenize: {err}", file=sys.stderr)
        return 1
    ids = tokenizer.encode(args.text, clean=args.clean)
    print(f"{len(ids)} tokens")
    print(json.dumps(ids))
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        print(f"{token_id:>6}  {piece}")
    return 0
