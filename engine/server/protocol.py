"""The wire format of the OpenAI-compatible API: request and response models with OpenAI's field names.

Requests are validated strictly where they enter (no "5" for 5, no unknown fields, no NaN); a failure becomes an
`APIError` naming the field, which the serving layer turns into OpenAI's error body.

Fields checked by a plain validator carry their wire schema (`WithJsonSchema`), so /openapi.json (openapi.py) says
what the validator accepts; openapi.py bounds each token id's schema (titled TokenId) by the served vocabulary.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator
from typing_extensions import Self

from hayabusa.engine.sample.logits_processors import MAX_BAD_WORD_TOKENS, MAX_LOGIT_BIAS, MAX_NO_REPEAT_NGRAM_SIZE
from hayabusa.engine.sampling_params import MAX_FLOAT32, MAX_LENGTH_PENALTY, MIN_NORMAL_FLOAT32

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20
MAX_N = 128  # as OpenAI; the engine also needs n <= its max_num_seqs
MAX_SEED = (1 << 63) - 1  # the engine keys int64 noise with it

Prompt = str | list[str] | list[int] | list[list[int]]

# Wire schemas of the fields a plain validator checks.
TOKEN_ID_SCHEMA = {"title": "TokenId", "type": "integer", "minimum": 0}  # the engine checks: < the vocabulary size
TOKEN_IDS_SCHEMA = {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1}
PROMPT_SCHEMA = {
    "description": "A text, a list of texts, a list of token ids, or a list of those (each a prompt of its own; "
                   "none empty)",
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
              TOKEN_IDS_SCHEMA,
              {"type": "array", "items": TOKEN_IDS_SCHEMA, "minItems": 1}],
}
STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS}]}
LOGIT_BIAS_SCHEMA = {
    "description": "Token id (a decimal string) -> bias added to its logit",
    "type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
}
BAD_WORD_SCHEMA = {**TOKEN_IDS_SCHEMA, "maxItems": MAX_BAD_WORD_TOKENS}
EOS_TOKEN_ID_SCHEMA = {"anyOf": [TOKEN_ID_SCHEMA, TOKEN_IDS_SCHEMA]}
EARLY_STOPPING_SCHEMA = {"anyOf": [{"type": "boolean"}, {"const": "never"}]}
JSON_SCHEMA_SCHEMA = {"description": "A JSON schema (an object, or its JSON text)",
                      "anyOf": [{"type": "object"}, {"type": "string", "minLength": 1}]}
CHOICE_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
SUFFIX_SCHEMA = {"description": "Insertion is not supported: only null", "type": "null"}


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StrictRequest(BaseModel):
    """A request body: strict types, no unknown fields, no NaN; `parse` turns pydantic's complaint into a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def parse(cls, body: bytes) -> Self:
        try:
            return cls.model_validate_json(body)
        except ValidationError as err:
            raise validation_error(err) from None


class StreamOptions(StrictRequest):
    include_usage: bool = False


class StructuredOutputsRequest(StrictRequest):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object (engine.structured_outputs
    checks the rest: one given, the schema, regex or grammar valid)."""

    json_: Annotated[dict[str, Any] | str | None, WithJsonSchema(JSON_SCHEMA_SCHEMA)] = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str] | None, WithJsonSchema(CHOICE_SCHEMA)] = None
    grammar: str | None = None  # GBNF or Lark
    json_object: bool | None = None
    disable_any_whitespace: bool = True  # compact JSON (True by default here, unlike vLLM)


class JsonSchemaFormat(StrictRequest):
    """OpenAI's response_format.json_schema."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(StrictRequest):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(StrictRequest):
    model: str
    prompt: Annotated[Prompt, WithJsonSchema(PROMPT_SCHEMA)]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo (serving checks): the prompt and its logprobs
    temperature: float = Field(1.0, ge=0.0, le=MAX_FLOAT32)  # 0: greedy; the sampler holds it in float32
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None  # accepted and ignored, as a self-hosted server has no per-user accounting
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[int, float], WithJsonSchema(LOGIT_BIAS_SCHEMA)] = {}  # keys: ids as strings ("50256")
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # None: n (serving checks best_of >= n)
    suffix: Annotated[None, WithJsonSchema(SUFFIX_SCHEMA)] = None  # no insertion: only null (or no field) passes
    # hayabusa's own sampling fields (vLLM spells them the same way).
    top_k: int = Field(0, ge=0)  # 0: off
    repetition_penalty: float = Field(1.0, ge=MIN_NORMAL_FLOAT32, le=MAX_FLOAT32)  # float32 too
    ignore_eos: bool = False
    # transformers' generate options, with their names (README: generate options); SamplingParams checks the rest.
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    min_new_tokens: int = Field(0, ge=0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE)
    bad_words_ids: list[Annotated[list[int], WithJsonSchema(BAD_WORD_SCHEMA)]] = []
    eos_token_id: Annotated[int | list[int] | None, WithJsonSchema(EOS_TOKEN_ID_SCHEMA)] = None
    prompt_lookup_num_tokens: int | None = Field(None, ge=1)
    max_matching_ngram_size: int | None = Field(None, ge=1)
    num_beams: int = Field(1, ge=1)  # n picks how many of the beams come back (n <= num_beams)
    length_penalty: float = Field(1.0, ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY)
    early_stopping: Annotated[bool | Literal["never"], WithJsonSchema(EARLY_STOPPING_SCHEMA)] = False
    # Structured outputs (vLLM's fields): one of structured_outputs, the older guided_* spellings, response_format.
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: Annotated[dict[str, Any] | str | None, WithJsonSchema(JSON_SCHEMA_SCHEMA)] = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str] | None, WithJsonSchema(CHOICE_SCHEMA)] = None
    guided_grammar: str | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes every optional field nullable; null asks for the default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Prompt:
        def is_ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)

        if isinstance(prompt, str) or is_ids(prompt):
            return prompt
        if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                    or all(is_ids(p) for p in prompt)):
            return prompt
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, or a list of those "
                         "(none empty)")

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> dict[int, float]:
        if not isinstance(value, dict):
            raise ValueError("must be an object mapping token ids to biases")
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"holds {len(value)} entries; at most {MAX_LOGIT_BIAS} are supported")
        bias = {}
        for key, number in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"key {key!r} is not a token id (a non-negative integer, as a string)")
            if type(number) not in (int, float) or not -100 <= number <= 100:
                raise ValueError(f"the bias of token {key} must be a number in [-100, 100], got {number!r}")
            bias[int(key)] = float(number)
        return bias

    @field_validator("suffix", mode="plain")
    @classmethod
    def _refuse_suffix(cls, value: Any) -> None:
        raise ValueError("is not supported for this model (it continues text; it does not insert between a prompt "
                         "and a suffix); send null or leave it out")

    @field_validator("early_stopping", mode="plain")
    @classmethod
    def _check_early_stopping(cls, value: Any) -> bool | str:
        if value is True or value is False or value == "never":
            return value
        raise ValueError('must be true, false or "never"')

    @field_validator("eos_token_id", mode="plain")
    @classmethod
    def _check_eos_token_id(cls, value: Any) -> int | list[int]:
        if type(value) is int or isinstance(value, list) and value and all(type(t) is int for t in value):
            return value
        raise ValueError("must be a token id or a non-empty list of token ids")

    @field_validator("stop", mode="after")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
        return stop


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"the model '{model}' does not exist; this server serves '{served}'", param="model",
                    code="model_not_found")


def validation_error(err: ValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the field."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['ctx']['error']}")
    if param is None:
        return APIError(400, f"the request body must be a JSON object of the request's fields: {first['msg']}")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"'{param}': {message}", param=param)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs: per token its text, logprob (None for a prompt's first token, which has no
    prefix), most likely alternatives by text (None there too) and where its text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None  # when the request set logprobs
    finish_reason: Literal["stop", "length", "abort"] | None  # abort: the server shut down before it ended
    # With a structured output constraint, on the choice's last chunk: whether text is a whole match (false: it ran
    # out of max_tokens first, or a stop string cut it). null otherwise.
    structured_output_complete: bool | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # None in stream chunks unless include_usage asked for it (last chunk)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hayabusa"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, server_error, ...
    param: str | None  # the request field at fault, if one is
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (APIError.body)."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: str  # "ok"; else why the server cannot serve (503)


class VersionInfo(BaseModel):
    version: str  # hayabusa's
