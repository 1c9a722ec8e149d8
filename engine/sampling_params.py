"""`SamplingParams`: how one request generates (transformers' generate options and OpenAI's, same names and
meaning), each value checked when the params are made, so a request's options are valid wherever they travel.

What the options do to the logits is engine.sample.ops (the order of the processors and warpers); the seeds that key
sampled draws are engine.sample.seeds; structured outputs (what the text must match) are engine.structured_outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hayabusa.engine.sample.logits_processors import (
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_NO_REPEAT_NGRAM_SIZE,
)
from hayabusa.engine.structured_outputs import StructuredOutputs, as_structured_outputs

MAX_LOGPROBS = 20  # as OpenAI's completions API: logprobs and prompt_logprobs are 0..20
# The sampler holds temperature and repetition_penalty as float32: beyond these they would become inf or 0.
MAX_FLOAT32 = 3.4028234663852886e38
MIN_NORMAL_FLOAT32 = 1.1754943508222875e-38
# Beam scores are divided by generated_tokens ** length_penalty, a float64: 2048 ** 64 is still far inside its range.
MAX_LENGTH_PENALTY = 64.0


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    do_sample: bool = False
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # transformers' generate options, same names and meaning:
    min_new_tokens: int = 0  # eos is forbidden until this many tokens are generated
    no_repeat_ngram_size: int = 0  # 0: off; else no n-gram of this size occurs twice (prompt included)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that are never completed
    min_p: float = 0.0  # 0: off (sampling only)
    typical_p: float = 1.0  # 1: off (sampling only)
    eos_token_id: int | tuple[int, ...] | None = None  # None: the model's; several: stop at any of them
    # Prompt-lookup speculation: draft this many tokens from the sequence's own n-grams, check them in one pass.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None  # None: 2
    num_return_sequences: int = 1  # completions of the prompt; they share its KV blocks
    # Logprobs from the raw logits (engine.sample.logprobs): of each generated token with its `logprobs` most likely
    # alternatives; of each prompt token (but the first) with its `prompt_logprobs` alternatives. None: off.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Beam search (transformers' names and meaning; engine.decoding.beam_search): num_beams > 1 keeps that many
    # hypotheses and returns the num_return_sequences best, best first. A hypothesis scores its summed log-probabilities
    # over generated_tokens ** length_penalty. early_stopping: True ends once num_beams hypotheses are done; False when
    # the best running beam, scored at its current length, cannot beat them; "never" when it cannot at any length.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # OpenAI's options (its names and meaning). Penalties: logits[j] -= frequency_penalty * count[j] +
    # presence_penalty * (count[j] > 0), count[j] = occurrences of token j among the tokens generated so far (the
    # prompt's do not count); -2.0..2.0, 0: off. logit_bias: token id -> -100..100 added to its logit (at most
    # MAX_LOGIT_BIAS entries). best_of: sample that many candidates and return the num_return_sequences whose
    # generated tokens have the highest summed logprob, best first (None: num_return_sequences; a greedy request's
    # candidates would all be the same, so it runs num_return_sequences).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)
    best_of: int | None = None
    # What the generated text must match (a JSON schema, a regex, one of some strings, a grammar): a
    # StructuredOutputs, or a dict of its fields. The output ends (on eos) where the constraint is met; greedy,
    # sampling, n, best_of and beams all keep to it.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "bad_words_ids", _token_lists("bad_words_ids", self.bad_words_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "structured_outputs", as_structured_outputs(self.structured_outputs))
        if self.eos_token_id is not None:
            eos = (self.eos_token_id,) if _is_natural(self.eos_token_id) else self.eos_token_id
            if not _is_token_list(eos):
                raise ValueError(f"eos_token_id must be a token id or a non-empty list of token ids (integers >= 0), "
                                 f"got {self.eos_token_id!r}")
            object.__setattr__(self, "eos_token_id", tuple(eos))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0 (0: only score the prompt), "
                             f"got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= MAX_FLOAT32:
            raise ValueError(f"temperature must be a number in [0, {MAX_FLOAT32:.7g}] (float32's largest: the sampler "
                             f"holds it in float32), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not MIN_NORMAL_FLOAT32 <= self.repetition_penalty <= MAX_FLOAT32:
            raise ValueError(f"repetition_penalty must be > 0, in [{MIN_NORMAL_FLOAT32:.7g}, {MAX_FLOAT32:.7g}] "
                             f"(float32's normal range: the sampler holds it in float32), got "
                             f"{self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63):
            raise ValueError(f"seed must be a non-negative integer below 2**63 (it keys int64 noise), "
                             f"got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        self._check_processors()
        self._check_completions()

    def _check_processors(self) -> None:
        if not _is_natural(self.min_new_tokens):
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not _is_natural(self.no_repeat_ngram_size) or self.no_repeat_ngram_size > MAX_NO_REPEAT_NGRAM_SIZE:
            raise ValueError(f"no_repeat_ngram_size must be an integer in [0, {MAX_NO_REPEAT_NGRAM_SIZE}] (0 disables "
                             f"it), got {self.no_repeat_ngram_size!r}")
        too_long = [word for word in self.bad_words_ids if len(word) > MAX_BAD_WORD_TOKENS]
        if too_long:
            raise ValueError(f"bad_words_ids holds a word of {len(too_long[0])} tokens; at most {MAX_BAD_WORD_TOKENS} "
                             f"are supported")
        num_multi = len({word for word in self.bad_words_ids if len(word) > 1})
        if num_multi > MAX_BAD_WORDS:
            raise ValueError(f"bad_words_ids holds {num_multi} words of several tokens; at most {MAX_BAD_WORDS} are "
                             f"supported (single-token words are not limited)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            value = getattr(self, name)
            if value is not None and (not _is_natural(value) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if self.max_matching_ngram_size is not None and self.prompt_lookup_num_tokens is None:
            raise ValueError("max_matching_ngram_size needs prompt_lookup_num_tokens (it sizes prompt-lookup drafts)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2] (0: off), got {value!r}")

    def _check_completions(self) -> None:
        if not _is_natural(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.best_of is not None and (not _is_natural(self.best_of) or self.best_of < self.num_return_sequences):
            raise ValueError(f"best_of must be None or an integer >= num_return_sequences ({self.num_return_sequences}"
                             f"): it samples best_of candidates and returns the best n, got {self.best_of!r}")
        wants_logprobs = self.logprobs is not None or self.prompt_logprobs is not None
        if self.prompt_lookup_num_tokens is not None and wants_logprobs:
            raise ValueError("logprobs and prompt_logprobs are not supported with prompt_lookup_num_tokens (a draft "
                             "check samples several tokens per step); drop one of them")
        if self.structured_outputs is not None:
            self._check_structured()
        if self.prompt_lookup_num_tokens is not None and self.ranks_candidates:
            raise ValueError("best_of > num_return_sequences is not supported with prompt_lookup_num_tokens "
                             "(candidates are ranked by their tokens' logprobs, which a draft check does not compute)")
        self._check_beams()

    def _check_structured(self) -> None:
        refused = {
            "ignore_eos": self.ignore_eos and "a constrained text ends on eos where its grammar ends",
            "prompt_lookup_num_tokens": self.prompt_lookup_num_tokens is not None
            and "each token of a constrained text is checked against the grammar before the next is drawn",
        }
        for option, why in refused.items():
            if why:
                raise ValueError(f"{option} is not supported with structured_outputs: {why}")

    def _check_beams(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1 (1: no beam search), got {self.num_beams!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, int | float) \
                or not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}] "
                             f"(beam scores divide by length ** length_penalty), got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams == 1:
            return
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}): beam search returns its best hypotheses")
        refused = {
            "do_sample=True": self.do_sample and "beam sampling is not supported; use num_beams with do_sample=False, "
                                                 "or do_sample=True with num_return_sequences for several samples",
            "logprobs": self.logprobs is not None and "a beam's tokens are ranked by its sequence score (out.score); "
                                                      "score the returned sequences with Engine.score",
            "prompt_logprobs": self.prompt_logprobs is not None and "use Engine.score for the prompt's logprobs",
            "stop": bool(self.stop) and "beams end on eos or max_new_tokens only",
            "max_new_tokens=0": self.max_new_tokens == 0 and "beam search generates at least one token",
            "prompt_lookup_num_tokens": self.prompt_lookup_num_tokens is not None
            and "beams are scored a token at a time",
        }
        for option, why in refused.items():
            if why:
                raise ValueError(f"{option} is not supported with num_beams > 1: {why}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def needs_processors(self) -> bool:
        """Whether any option beyond temperature, top-k, top-p and the repetition penalty is in effect."""
        warped = not self.greedy and (self.min_p > 0 or self.typical_p < 1)
        return bool(self.min_new_tokens or self.no_repeat_ngram_size or self.bad_words_ids or warped
                    or self.logit_bias or self.penalizes_generated)

    @property
    def penalizes_generated(self) -> bool:
        """Whether the frequency or presence penalty is on (they count the generated tokens)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the row's token history (n-gram and multi-token bad-word rules, the frequency and
        presence penalties)."""
        return self.no_repeat_ngram_size > 0 or any(len(word) > 1 for word in self.bad_words_ids) \
            or self.penalizes_generated

    @property
    def num_candidates(self) -> int:
        """Sequences the request runs: best_of when it samples, else num_return_sequences (greedy candidates would
        all be the same)."""
        return self.num_return_sequences if self.best_of is None or self.greedy else self.best_of

    @property
    def ranks_candidates(self) -> bool:
        """Whether the request keeps the best num_return_sequences of more candidates (best_of)."""
        return self.num_candidates > self.num_return_sequences

    @property
    def wants_token_logprobs(self) -> bool:
        """Whether its sampled tokens' logprobs are computed: asked for, or to rank best_of candidates."""
        return self.logprobs is not None or self.ranks_candidates


def eos_token_ids(params: SamplingParams, model_eos: int | None) -> tuple[int, ...]:
    """The ids that end a request: params.eos_token_id, or the model's."""
    if params.eos_token_id is not None:
        return params.eos_token_id
    return () if model_eos is None else (model_eos,)


def _is_natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_token_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0 \
        and all(_is_natural(t) for t in value)


def _token_lists(name: str, value: object) -> tuple[tuple[int, ...], ...]:
    """A list of non-empty token-id lists as a tuple of tuples; ValueError naming `name` otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(map(_is_token_list, value)):
        raise ValueError(f"{name} must be a list of non-empty lists of token ids (integers >= 0), got {value!r}")
    return tuple(tuple(word) for word in value)


def _logit_bias(value: object) -> dict[int, float]:
    """logit_bias as a new {token id: float bias} dict; ValueError naming the bad entry otherwise. A key may also be
    a token id's decimal string, as JSON writes keys (a jsonl line of `hayabusa batch`, OpenAI's wire format)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {value!r}")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias holds {len(value)} entries; at most {MAX_LOGIT_BIAS} are supported")
    bias = {}
    for key, number in value.items():
        token_id = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_natural(token_id):
            raise ValueError(f"logit_bias key {key!r} is not a token id (an integer >= 0, or its decimal string)")
        if isinstance(number, bool) or not isinstance(number, int | float) or not -100 <= number <= 100:
            raise ValueError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {number!r}")
        bias[token_id] = float(number)
    return dict(sorted(bias.items()))


# The requests of score(): prompt logprobs only; their top-1 alternative tells whether each token was the greedy pick.
SCORING = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
