"""`hayabusa batch`'s input: a jsonl file read and every line checked before any model loads.

A line is {"prompt": text or token ids, ...} plus `Engine.generate`'s sampling keywords; an output constraint as the
server takes it (`structured_outputs`, a `guided_*` field or `response_format`). A problem is a ValueError
naming the file, the line and the field: bytes that are not UTF-8, a line that is not JSON, an empty prompt, an
unknown field, a field of the wrong JSON type (checked against SamplingParams' annotations, so that "false" is no
true and "hot" no temperature), and whatever SamplingParams refuses.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.structured_outputs import GUIDED_ALIASES, from_request_fields

# One output line per input line, text only: several completions and logprobs are for the Python API and the server.
PER_LINE_UNSUPPORTED = frozenset({"num_return_sequences", "logprobs", "prompt_logprobs"})
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams)) - PER_LINE_UNSUPPORTED
CONSTRAINT_FIELDS = ("structured_outputs", *GUIDED_ALIASES, "response_format")  # what from_request_fields reads
FIELD_TYPES = typing.get_type_hints(SamplingParams)

Prompt = str | list[int]


def read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a jsonl file with their line numbers (from 1). Lines end at "\\n" only: JSON text may
    hold U+2028 or U+0085 raw, which str.splitlines would also split at."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); jsonl is UTF-8 text") \
            from None
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no lines")
    return lines


def parse_line(text: str, where: str) -> tuple[Prompt, SamplingParams]:
    """One input line -> (prompt, params); ValueError naming `where` (file:line) and the bad field."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{where}: each line must be a JSON object with a \"prompt\"")
    prompt = record.pop("prompt")
    if not (isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt)):
        raise ValueError(f"{where}: \"prompt\" must be a string or a list of token ids (integers >= 0), got "
                         f"{prompt!r}")
    if not prompt:
        raise ValueError(f"{where}: \"prompt\" is empty")
    unsupported = sorted(set(record) & PER_LINE_UNSUPPORTED)
    if unsupported:
        raise ValueError(f"{where}: {unsupported[0]!r} is not supported by hayabusa batch (one text per line); use "
                         f"Engine.generate or the server")
    known = SAMPLING_FIELDS | set(CONSTRAINT_FIELDS)
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; known: prompt, {', '.join(sorted(known))}")
    try:
        constraint = from_request_fields({name: record.pop(name) for name in CONSTRAINT_FIELDS if name in record})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if constraint is not None:
        record["structured_outputs"] = constraint
    for name, value in record.items():
        if not _matches(value, FIELD_TYPES[name]):
            raise ValueError(f"{where}: {name!r} must be {_described(FIELD_TYPES[name])}, got {json.dumps(value)}")
    try:
        return prompt, SamplingParams(**record)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type a SamplingParams annotation asks for; a tuple also takes one bare element,
    as SamplingParams reads stop="x" as ("x",). Kinds not spelled out here are left to SamplingParams."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) or _matches(value, args[0])
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), type(None): (type(None),)}
    if hint not in kinds:
        return True
    return type(value) in kinds[hint]  # (no bool for a number: True is an int to isinstance)


def _described(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_described(arg, plural) for arg in args)
    if origin is tuple:
        return f"{'lists' if plural else 'a list'} of {_described(args[0], plural=True)}"
    singular, several = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
                         float: ("a number", "numbers"), str: ("a string", "strings"),
                         type(None): ("null", "nulls")}.get(hint, (str(hint), str(hint)))
    return several if plural else singular
