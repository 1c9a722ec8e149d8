"""Bounded constraints for the structured-output tests, and the check that an output keeps to its constraint.

A random-weight model writes noise, so the constraint is the only structure in its outputs: with lengths, item counts
and enums bounded and max_new_tokens above the longest spelling (a character may come as \\uXXXX escapes or as bytes),
every output must be a whole match.
"""

from __future__ import annotations

import json
import re

import jsonschema

from hayabusa.engine.outputs import GenerationOutput
from hayabusa.engine.structured_outputs import StructuredOutputs

# Spaces, newlines, emoji and kana, in keys, enums and free strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "名前": {"type": "string", "maxLength": 4},
        "年齢": {"type": "integer", "minimum": 0, "maximum": 120},
        "気分": {"enum": ["😀 うれしい", "かなしい\nとても", "ふつう"]},
        "タグ": {"type": "array", "items": {"enum": ["猫", "犬 🐯", "は\tい"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["名前", "年齢", "気分", "タグ", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{2,3}-[ぁ-ん]{2} (😀|🍙)\n(はい|いいえ)"
CHOICES = ("はい", "いいえ", "たぶん そう", "🐯\n🍙")
GRAMMAR = 'root ::= "答え: " answer ("、" answer)? "。"\nanswer ::= "はい" | "いいえ" | [0-9] [0-9]?'
GRAMMAR_TEXT = re.compile(r"答え: (はい|いいえ|[0-9]{1,2})(、(はい|いいえ|[0-9]{1,2}))?。")

CONSTRAINTS = {
    "json": StructuredOutputs(json=SCHEMA),
    "regex": StructuredOutputs(regex=REGEX),
    "choice": StructuredOutputs(choice=CHOICES),
    "grammar": StructuredOutputs(grammar=GRAMMAR),
}
# Enough for the longest spelling of each: a JSON string character may take a 6-token \uXXXX escape.
MAX_NEW_TOKENS = {"json": 200, "regex": 40, "choice": 24, "grammar": 40}


def assert_matches(kind: str, out: GenerationOutput) -> None:
    """out ended on eos (finish_reason "stop") and its text is a whole match of CONSTRAINTS[kind]."""
    assert out.finish_reason == "stop" and out.structured_output_complete is True, (out.finish_reason, out.text)
    if kind == "json":
        jsonschema.validate(json.loads(out.text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, out.text), out.text
    elif kind == "choice":
        assert out.text in CHOICES, out.text
    else:
        assert GRAMMAR_TEXT.fullmatch(out.text), out.text
