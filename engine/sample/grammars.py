"""Structured outputs on llguidance: a constraint becomes a grammar (validated once, when the request's params are
made), compiled once per engine against the model's vocabulary (engine.sample.grammar_vocab) and cached; each
sequence walks it with a `GrammarMatcher`, and each step `fill_masks` writes the allowed tokens of the batch's
constrained rows as bitmasks (int32 [rows, ceil(vocab / 32)], bit t % 32 of word t // 32 set for an allowed token t),
which the sampler applies on the device (engine.sample.ops.allowed_tokens).

Why llguidance (not xgrammar): it takes any vocabulary as plain bytes per token with special tokens marked, which is
what this non-Hugging-Face tokenizer needs (byte-fallback `<|byteN|>` tokens, `<SP>`/`<BR>`, class tokens whose text
does not encode back to them); its wheel is one abi3 binary with no dependencies, so nothing couples it to a torch,
triton or transformers version (xgrammar's requires torch, transformers and triton, and its wheels are per Python
version); and it fills a batch's masks in parallel on the host (LLExecutor) into any buffer.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hayabusa.engine.sample.grammar_vocab import llguidance_tokenizer

if TYPE_CHECKING:
    from hayabusa.engine.structured_outputs import StructuredOutputs
    from hayabusa.tokenizer import Tokenizer

COMPILED_CACHE_SIZE = 64  # compiled grammars an engine keeps (least recently used dropped first)
MAX_ERROR_CHARS = 600


def _llguidance() -> Any:
    try:
        import llguidance
    except ModuleNotFoundError:
        raise ModuleNotFoundError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


def mask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def grammar_definition(kind: str, value: Any, disable_any_whitespace: bool) -> str:
    """llguidance's grammar of one constraint (StructuredOutputs.kind and .value); ValueError naming what is wrong
    with it (a schema keyword it does not support, a regex that does not parse, ...)."""
    text = json.dumps(value, ensure_ascii=False) if kind in ("json", "json_object") else value
    return _definition(kind, text if kind != "choice" else tuple(value), disable_any_whitespace)


@functools.lru_cache(maxsize=256)
def _definition(kind: str, text: str | tuple[str, ...], disable_any_whitespace: bool) -> str:
    llguidance = _llguidance()
    matcher = llguidance.LLMatcher
    try:
        if kind in ("json", "json_object"):
            whitespace = {"whitespace_flexible": not disable_any_whitespace}
            grammar = matcher.grammar_from_json_schema(text, defaults=whitespace)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(text)
        elif kind == "choice":  # JSON string literals are Lark's too
            grammar = matcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in text))
        else:
            grammar = llguidance.grammar_from("grammar", text)  # GBNF or Lark
    except ValueError as err:
        raise ValueError(f"structured_outputs.{kind} is invalid: {_short(str(err))}") from None
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"structured_outputs.{kind} is invalid: {_short(messages[0])}")
    return grammar


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " ..."


class GrammarMatcher:
    """One sequence's place in its grammar: the tokens it accepted so far."""

    __slots__ = ("_matcher", "_template", "vocab_size")

    def __init__(self, matcher: Any, template: Any, vocab_size: int) -> None:
        self._matcher = matcher  # llguidance.LLMatcher
        self._template = template  # the compiled grammar at its start (shared, never advanced)
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it here (the matcher is then failed)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_complete(self) -> bool:
        """The tokens so far form a whole match (the grammar may end here)."""
        return self._matcher.is_accepting()

    @property
    def failed(self) -> bool:
        return self._matcher.is_error()

    def copy(self) -> GrammarMatcher:
        """An independent matcher at the same place."""
        return GrammarMatcher(self._matcher.deep_copy(), self._template, self.vocab_size)

    def restarted(self) -> GrammarMatcher:
        """A matcher of the same grammar at its start."""
        return GrammarMatcher(self._template.deep_copy(), self._template, self.vocab_size)


class GrammarCompiler:
    """An engine's compiled grammars, by (grammar, eos ids): the same constraint compiles once (`num_compiles`
    counts), and each request gets a copy at the start. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = COMPILED_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self.cache_size = cache_size
        self.num_compiles = 0
        self._compiled: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()
        self._vocabularies: dict[tuple[int, ...], Any] = {}  # eos ids -> llguidance.LLTokenizer
        self._lock = threading.Lock()

    def matcher(self, spec: StructuredOutputs, eos_token_ids: tuple[int, ...]) -> GrammarMatcher:
        """A matcher at the start of spec's grammar, where eos_token_ids end the text; ValueError if the grammar
        does not compile against the vocabulary."""
        key = (spec.definition, tuple(eos_token_ids))
        with self._lock:
            template = self._compiled.get(key)
            if template is None:
                template = self._compile(spec, key)
                self._compiled[key] = template
                if len(self._compiled) > self.cache_size:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
        return GrammarMatcher(template.deep_copy(), template, self.vocab_size)

    def _compile(self, spec: StructuredOutputs, key: tuple[str, tuple[int, ...]]) -> Any:
        llguidance = _llguidance()
        eos = key[1]
        vocabulary = self._vocabularies.get(eos)
        if vocabulary is None:
            vocabulary = self._vocabularies[eos] = llguidance_tokenizer(self.tokenizer, eos, self.vocab_size)
        template = llguidance.LLMatcher(vocabulary, key[0], log_level=0)
        if template.is_error():
            raise ValueError(f"structured_outputs.{spec.kind} does not compile: {_short(template.get_error())}")
        self.num_compiles += 1
        return template


_executor: Any = None  # llguidance.LLExecutor, made on first use (its threads: 80% of the cores, up to 32)


def fill_masks(rows: Sequence[tuple[GrammarMatcher, int]], masks: np.ndarray) -> None:
    """Write the allowed tokens of each (matcher, row) into masks[row] (int32 [rows, mask_words], C-contiguous), the
    rows in parallel; rows not named are left as they are. A failed matcher allows nothing."""
    global _executor
    if _executor is None:
        _executor = _llguidance().LLExecutor()
    live = [(matcher._matcher, row) for matcher, row in rows if not matcher.failed]
    if live:
        _executor.unsafe_compute_mask_ptr(live, masks.ctypes.data, masks.shape[1] * 4, masks.shape[0])
    for matcher, row in rows:
        if matcher.failed:  # llguidance would still allow eos
            masks[row] = 0


def grammar_masks(rows: Sequence[tuple[GrammarMatcher, int]], num_rows: int) -> np.ndarray:
    """int32 [num_rows, mask_words(vocab)]: the allowed tokens of the named rows (at least one), every token
    elsewhere."""
    masks = np.full((num_rows, mask_words(rows[0][0].vocab_size)), -1, dtype=np.int32)
    fill_masks(rows, masks)
    return masks
