"""SamplingParams' errors in the words of the surface the user typed.

SamplingParams and the engine name the fields in their errors ("max_new_tokens must be ..."), but the CLI's user
typed --max-new-tokens and the server's client sent max_tokens. Each surface keeps one mapping, SamplingParams field
-> its own name, and respells an error with it where the error turns into the user's error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields

from hayabusa.engine.sampling_params import SamplingParams

# A field's name as a word of its own: not inside a longer name (stop in early_stopping) and not quoted, as a value
# echoed back in an error is (got ('top_k',)).
_FIELD = re.compile(r"(?<![\w'\"])(" + "|".join(sorted((f.name for f in fields(SamplingParams)), key=len,
                                                         reverse=True)) + r")(?![\w'\"])")


def respelled(message: str, name_of: Callable[[str], str]) -> tuple[str, str | None]:
    """(message with every SamplingParams field it names spelled `name_of(field)`, the respelled name of the first
    one; None when it names none)."""
    names = [name_of(field) for field in _FIELD.findall(message)]
    return _FIELD.sub(lambda match: name_of(match.group(1)), message), names[0] if names else None
