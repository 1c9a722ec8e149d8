"""/v1/completions: a validated request -> engine submissions; engine updates -> a response or SSE chunks.

The one place where OpenAI's fields meet the engine's: `sampling_params` maps the request (n ->
num_return_sequences, logprobs -> logprobs, and with echo also -> prompt_logprobs; presence_penalty,
frequency_penalty, logit_bias and best_of keep their names); choice i * n + j is prompt i's completion j
(RequestUpdate.index j; with best_of the j-th best candidate), in plain responses and in streams alike; an echoed
choice starts with its prompt's text (its tokens decoded) and, with logprobs, the prompt tokens' logprobs (None for
the first).

Every failure leaves through `api_error` (one place, one shape): bad input or a request past a limit (limits.py)
400, unknown model 404, full queue 429 with Retry-After, engine failure 500 (the exception's name and message, never
a traceback). A request a draining server aborted (engine_loop.abort_all) ends with finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from hayabusa.engine.outputs import GenerationOutput, TokenLogprobs
from hayabusa.engine.param_names import respelled
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.server.completion_logprobs import ChoiceLogprobs, joined
from hayabusa.engine.server.engine_loop import EngineFailedError, EngineLoop, QueueFullError, Submission
from hayabusa.engine.server.limits import RequestLimits
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    model_not_found,
)
from hayabusa.engine.structured_outputs import StructuredOutputs, from_request_fields
from hayabusa.tokenizer import Tokenizer

logger = logging.getLogger("hayabusa.server")

RETRY_AFTER_S = 1  # a full queue drains in about a prefill's time

WaitDisconnect = Callable[[], Awaitable[None]]  # returns when the client has gone away


def sampling_params(request: CompletionRequest) -> SamplingParams:
    """The OpenAI request's sampling fields in the engine's terms (temperature 0 = greedy)."""
    if request.num_beams > 1 and request.temperature > 0:  # OpenAI's default temperature is 1: say what to send
        raise APIError(400, "num_beams > 1 needs temperature 0: beam search is greedy (and temperature defaults to 1)",
                       param="temperature")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    structured = structured_outputs(request)
    return SamplingParams(max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
                          temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                          repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop,
                          ignore_eos=request.ignore_eos, num_return_sequences=request.n, logprobs=request.logprobs,
                          prompt_logprobs=request.logprobs if request.echo else None,
                          min_p=request.min_p, typical_p=request.typical_p, min_new_tokens=request.min_new_tokens,
                          no_repeat_ngram_size=request.no_repeat_ngram_size,
                          bad_words_ids=tuple(map(tuple, request.bad_words_ids)), eos_token_id=request.eos_token_id,
                          prompt_lookup_num_tokens=request.prompt_lookup_num_tokens,
                          max_matching_ngram_size=request.max_matching_ngram_size, num_beams=request.num_beams,
                          length_penalty=request.length_penalty, early_stopping=request.early_stopping,
                          presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                          logit_bias=request.logit_bias, best_of=request.best_of, structured_outputs=structured)


STRUCTURED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "response_format")


def structured_outputs(request: CompletionRequest) -> StructuredOutputs | None:
    """The request's output constraint, from whichever field carries it; a 400 naming that field when it is invalid
    (a bad schema, regex or grammar is refused here, before any decoding)."""
    fields = {name: getattr(request, name) for name in STRUCTURED_FIELDS if getattr(request, name) is not None}
    wire = {name: value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value
            for name, value in fields.items()}
    try:
        return from_request_fields(wire)
    except ValueError as err:
        param = next(iter(fields)) if len(fields) == 1 else None
        raise APIError(400, f"'{param}': {err}" if param else str(err), param=param) from None


def check_openai_options(request: CompletionRequest, vocab_size: int) -> None:
    """What OpenAI's best_of and logit_bias need beyond their types, as 400s naming the field."""
    best_of = request.best_of
    if best_of is not None and best_of < request.n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({request.n}): it generates best_of candidates and "
                            f"returns the n best", param="best_of")
    if request.stream and best_of is not None and best_of > request.n:
        raise APIError(400, f"best_of ({best_of}) > n ({request.n}) cannot stream: the best candidates are known only "
                            f"once all of them ended; drop stream or best_of", param="best_of")
    outside = [token_id for token_id in request.logit_bias if token_id >= vocab_size]
    if outside:
        raise APIError(400, f"logit_bias key '{outside[0]}' is not a token id of this model (the vocabulary is "
                            f"[0, {vocab_size}))", param="logit_bias")


# SamplingParams field -> the request field that sets it, where the names differ
REQUEST_FIELD_OF = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}


def request_error(err: ValueError) -> APIError:
    """A SamplingParams or engine error as a 400 in the fields the client sent (max_tokens, not max_new_tokens),
    `param` the first one it names."""
    message, param = respelled(str(err), lambda field: REQUEST_FIELD_OF.get(field, field))
    return APIError(400, message, param=param if param in CompletionRequest.model_fields else None)


def api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):
        return APIError(400, str(err))
    if isinstance(err, QueueFullError):
        return APIError(429, f"the server is busy ({err}); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(err, EngineFailedError):
        return APIError(500, str(err), type="server_error", code="engine_error")
    logger.error("unexpected error serving a request", exc_info=err)
    return APIError(500, f"internal error: {type(err).__name__}", type="server_error")


class CompletionServing:
    def __init__(self, loop: EngineLoop, tokenizer: Tokenizer, *, model_name: str, limits: RequestLimits,
                 metrics: ServerMetrics | None = None) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.metrics = metrics

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.limits.max_model_len)])

    def error(self, err: Exception) -> APIError:
        """The one exit of every failure: map it and count it."""
        error = api_error(err)
        if self.metrics is not None:
            self.metrics.on_rejected(error.status)
        return error

    async def create_completion(self, body: bytes, wait_disconnect: WaitDisconnect
                                ) -> CompletionResponse | AsyncIterator[str]:
        """A response, or SSE lines for a stream. Raises for errors before the first byte (see `error`)."""
        request = CompletionRequest.parse(body)
        if request.model != self.model_name:
            raise model_not_found(request.model, self.model_name)
        if request.max_tokens == 0 and not request.echo:
            raise APIError(400, "max_tokens 0 needs echo (to return the prompt, with logprobs its logprobs); "
                                "otherwise ask for at least 1 token", param="max_tokens")
        check_openai_options(request, self.loop.engine.config.vocab_size)
        prompts = await asyncio.to_thread(self._encode, request.prompt)  # off the event loop: streams keep flowing
        num_sequences = max(request.n, request.best_of or 1, request.num_beams)
        self.limits.check_completion(prompts, request.max_tokens, num_sequences)
        try:
            submission = self.loop.submit(prompts, sampling_params(request))
        except ValueError as err:  # SamplingParams' checks, or a prompt the engine can never run
            raise request_error(err) from None
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self._stream(submission, prompts, request, completion_id, include_usage, wait_disconnect)
        async with self._abort_on_disconnect(submission, wait_disconnect):
            outputs: dict[int, GenerationOutput] = {}
            async for index, update in submission.updates():
                if update.finished is not None:
                    outputs[index * request.n + update.index] = _checked(update.finished)
        if submission.closed:
            raise APIError(499, "the client closed the connection", code="client_closed")
        choices = []
        for choice, out in sorted(outputs.items()):
            prefix, pieces, completion = self._open_choice(prompts[choice // request.n], out.prompt_logprobs, request)
            if completion is not None:
                pieces.append(completion.piece(out.logprobs, out.token_ids))
            choices.append(CompletionChoice(index=choice, text=prefix + out.text, logprobs=_joined(pieces),
                                            finish_reason=out.finish_reason,
                                            structured_output_complete=out.structured_output_complete))
        return CompletionResponse(id=completion_id, model=self.model_name, choices=choices,
                                  usage=_usage(prompts, sum(len(out.token_ids) for out in outputs.values())))

    def _open_choice(self, prompt_ids: list[int], prompt_logprobs: list[TokenLogprobs | None] | None,
                     request: CompletionRequest) -> tuple[str, list[CompletionLogprobs], ChoiceLogprobs | None]:
        """What a choice starts with: its echoed prompt (text, and logprobs when asked), and the builder of its
        completion's logprobs (None when not asked)."""
        prefix, pieces = "", []
        if request.echo:
            prefix = self.tokenizer.decode(prompt_ids)
            if request.logprobs is not None:
                pieces.append(ChoiceLogprobs(self.tokenizer).piece(prompt_logprobs, prompt_ids))
        completion = ChoiceLogprobs(self.tokenizer, len(prefix)) if request.logprobs is not None else None
        return prefix, pieces, completion

    def _encode(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        return [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]

    async def _stream(self, submission: Submission, prompts: list[list[int]], request: CompletionRequest,
                      completion_id: str, include_usage: bool, wait_disconnect: WaitDisconnect) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            response = CompletionResponse(id=completion_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
            return f"data: {response.model_dump_json()}\n\n"

        num_tokens = 0
        completions: dict[int, ChoiceLogprobs | None] = {}  # choices begun: their completion's logprobs builder
        async with self._abort_on_disconnect(submission, wait_disconnect):
            try:
                async for index, update in submission.updates():
                    num_tokens += len(update.new_token_ids)
                    finished = _checked(update.finished) if update.finished is not None else None
                    choice, prefix, pieces = index * request.n + update.index, "", []
                    if choice not in completions:  # its first chunk: the echo goes first
                        prefix, pieces, completions[choice] = self._open_choice(prompts[index],
                                                                                update.prompt_logprobs, request)
                    completion = completions[choice]
                    if completion is not None and update.new_token_ids:
                        pieces.append(completion.piece(update.new_logprobs, update.new_token_ids))
                    if prefix or update.text_delta or pieces or finished is not None:
                        reason = finished.finish_reason if finished is not None else None
                        complete = finished.structured_output_complete if finished is not None else None
                        yield chunk([CompletionChoice(index=choice, text=prefix + update.text_delta,
                                                      logprobs=_joined(pieces), finish_reason=reason,
                                                      structured_output_complete=complete)])
                if submission.closed:
                    return  # the client went away
                if include_usage:
                    yield chunk([], _usage(prompts, num_tokens))
            except Exception as err:  # the headers are sent: the error travels as an event
                yield f"data: {json.dumps(self.error(err).body(), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

    @contextlib.asynccontextmanager
    async def _abort_on_disconnect(self, submission: Submission, wait_disconnect: WaitDisconnect
                                   ) -> AsyncIterator[None]:
        """Abort the submission when the client goes away while it runs, or when the caller leaves early."""

        async def watch() -> None:
            with contextlib.suppress(Exception):  # a broken receive channel is not proof of a disconnect
                await wait_disconnect()
                self.loop.abort(submission)

        watcher = asyncio.ensure_future(watch())
        try:
            yield
        finally:
            watcher.cancel()
            self.loop.abort(submission)  # a no-op once every request finished


def _joined(pieces: list[CompletionLogprobs]) -> CompletionLogprobs | None:
    return joined(pieces) if pieces else None


def _checked(output: GenerationOutput) -> GenerationOutput:
    """The output, unless the request failed alone in the engine (finish_reason "error"). "abort" passes: the
    server ended it while draining, and the client gets its text so far."""
    if output.finish_reason == "error":
        raise EngineFailedError(f"the request failed: {output.error}")
    return output


def _usage(prompts: list[list[int]], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
