"""`StructuredOutputs`: what a request's generated text must match (vLLM's structured outputs): a JSON schema, any
JSON object, a regular expression, one of a list of strings, or a grammar; checked when made, so that an invalid
schema or regex is refused before any decoding.

The grammar engine is llguidance (engine.sample.grammars): it compiles the constraint and, each step, the set of
tokens that keep the text on it, which the sampler applies on the device. `from_request_fields` reads the ways the
server's clients and `hayabusa batch` lines spell a constraint: vLLM's `structured_outputs` object, its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields, and OpenAI's `response_format`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The kinds of constraint, exactly one per request.
KINDS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}  # vLLM's older request fields


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of:
    - json: a JSON schema (a dict, or its JSON text): the text is a JSON value that validates against it;
    - json_object=True: the text is a JSON object (any);
    - regex: the text fully matches this regular expression (Rust `regex` syntax: no look-around, no backreferences);
    - choice: the text equals one of these strings;
    - grammar: the text derives from this context-free grammar, in GBNF (llama.cpp's EBNF: `root ::= ...`) or Lark
      (`start: ...`).

    disable_any_whitespace (vLLM's name; True by default here, unlike vLLM): JSON is written compact, with no
    whitespace between its tokens. A base model given the freedom pads JSON with spaces and newlines until
    max_new_tokens runs out; False allows that whitespace.
    """

    json: Mapping[str, Any] | str | None = field(default=None, hash=False)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = True
    # llguidance's grammar definition of the constraint (engine.sample.grammars.grammar_definition), made and
    # validated with the params: the key under which engines cache its compiled form.
    definition: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, Sequence) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got "
                                 f"{self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.json is not None and not isinstance(self.json, (Mapping, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object, or its JSON text), got "
                             f"{type(self.json).__name__}")
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be true or false, got {getattr(self, name)!r}")
        from hayabusa.engine.sample.grammars import grammar_definition  # llguidance loads with the first constraint

        object.__setattr__(self, "definition", grammar_definition(self.kind, self.value, self.disable_any_whitespace))

    @property
    def kind(self) -> str:
        """Which constraint it is: one of KINDS."""
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def value(self) -> Any:
        """The constraint itself: the schema (a dict; {"type": "object"} for json_object), regex, choices or grammar."""
        if self.json_object:
            return {"type": "object"}
        if isinstance(self.json, str):
            return _schema_from_text(self.json)
        return dict(self.json) if self.json is not None else getattr(self, self.kind)


def as_structured_outputs(value: object) -> StructuredOutputs | None:
    """SamplingParams' structured_outputs: a StructuredOutputs, a dict of its fields (as JSON gives it), or None."""
    if value is None or isinstance(value, StructuredOutputs):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"structured_outputs must be a StructuredOutputs or a dict of its fields "
                         f"({', '.join(KINDS)}, disable_any_whitespace), got {type(value).__name__}")
    unknown = sorted(set(value) - set(KINDS) - {"disable_any_whitespace"})
    if unknown:
        raise ValueError(f"structured_outputs has an unknown field {unknown[0]!r}; known: {', '.join(KINDS)}, "
                         f"disable_any_whitespace")
    return StructuredOutputs(**value)


def from_request_fields(fields: Mapping[str, Any]) -> StructuredOutputs | None:
    """The constraint of a request's fields (None if it has none): `structured_outputs` (a dict of
    StructuredOutputs' fields), one of the guided_* aliases, or `response_format` ({"type": "text"},
    {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}). ValueError
    naming the field when it is malformed or when more than one constraint is given."""
    given = {name: value for name, value in fields.items()
             if value is not None and (name in ("structured_outputs", *GUIDED_ALIASES)
                                       or name == "response_format" and _response_kind(value) != "text")}
    if len(given) > 1:
        raise ValueError(f"{' and '.join(sorted(given))} each constrain the output; send one of them")
    if not given:
        return None
    (name, value), = given.items()
    if name == "structured_outputs":
        return as_structured_outputs(value)
    if name in GUIDED_ALIASES:
        kind = GUIDED_ALIASES[name]
        return StructuredOutputs(**{kind: tuple(value) if kind == "choice" and isinstance(value, list) else value})
    if _response_kind(value) == "json_object":
        return StructuredOutputs(json_object=True)
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise ValueError('response_format of type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
    return StructuredOutputs(json=spec["schema"])


def _response_kind(value: object) -> str:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(f'response_format must be {{"type": "text" | "json_object" | "json_schema"}}, got {value!r}')
    return kind


def _schema_from_text(text: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
    return schema
