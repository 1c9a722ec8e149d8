"""/v1/completions: a validated request -> engine submissions; engine updates -> a response or SSE chunks.

Every failure leaves through `api_error` (one place, one shape): bad input 400, unknown model 404, full
queue 429 with Retry-After, engine failure 500 (the exception's name and message, never a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from hayabusa.engine.outputs import GenerationOutput
from hayabusa.engine.sampling import SamplingParams
from hayabusa.engine.server.engine_loop import EngineFailedError, EngineLoop, QueueFullError, Submission
from hayabusa.engine.server.metrics import ServerMetrics
from hayabusa.engine.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from hayabusa.tokenizer import Tokenizer

logger = logging.getLogger("hayabusa.server")

RETRY_AFTER_S = 1  # a full queue drains in about a prefill's time

# API fields whose engine feature is not built yet: field -> "was it asked for". The engine-features track
# replaces an entry by the wiring in `sampling_params` / the response builders.
NOT_YET_SUPPORTED: dict[str, Callable[[CompletionRequest], bool]] = {
    "logprobs": lambda request: request.logprobs is not None,
    "echo": lambda request: request.echo,
    "n": lambda request: request.n > 1,
}

WaitDisconnect = Callable[[], Awaitable[None]]  # returns when the client has gone away


def sampling_params(request: CompletionRequest) -> SamplingParams:
    """The OpenAI request's sampling fields in the engine's terms (temperature 0 = greedy)."""
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return SamplingParams(max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
                          temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                          repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop,
                          ignore_eos=request.ignore_eos)


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
    def __init__(self, loop: EngineLoop, tokenizer: Tokenizer, *, model_name: str, max_model_len: int,
                 metrics: ServerMetrics | None = None) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

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
            raise APIError(404, f"the model '{request.model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")
        for name, asked in NOT_YET_SUPPORTED.items():
            if asked(request):
                raise APIError(400, f"{name} is not supported by this build yet", param=name)
        prompts = self._encode(request.prompt)
        submission = self.loop.submit(prompts, sampling_params(request))
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self._stream(submission, prompts, completion_id, include_usage, wait_disconnect)
        async with self._abort_on_disconnect(submission, wait_disconnect):
            outputs: list[GenerationOutput | None] = [None] * len(prompts)
            async for index, update in submission.updates():
                if update.finished is not None:
                    outputs[index] = _checked(update.finished)
        if submission.closed:
            raise APIError(499, "the client closed the connection", code="client_closed")
        choices = [CompletionChoice(index=i, text=out.text, finish_reason=out.finish_reason)
                   for i, out in enumerate(outputs)]
        return CompletionResponse(id=completion_id, model=self.model_name, choices=choices,
                                  usage=_usage(prompts, sum(len(out.token_ids) for out in outputs)))

    def _encode(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        return [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]

    async def _stream(self, submission: Submission, prompts: list[list[int]], completion_id: str,
                      include_usage: bool, wait_disconnect: WaitDisconnect) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            response = CompletionResponse(id=completion_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage)
            return f"data: {response.model_dump_json()}\n\n"

        num_tokens = 0
        async with self._abort_on_disconnect(submission, wait_disconnect):
            try:
                async for index, update in submission.updates():
                    num_tokens += len(update.new_token_ids)
                    finished = _checked(update.finished) if update.finished is not None else None
                    if update.text_delta or finished is not None:
                        reason = finished.finish_reason if finished is not None else None
                        yield chunk([CompletionChoice(index=index, text=update.text_delta, finish_reason=reason)])
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


def _checked(output: GenerationOutput) -> GenerationOutput:
    if output.finish_reason not in ("stop", "length"):  # "error": the request failed alone in the engine
        raise EngineFailedError(f"the request failed: {output.error}")
    return output


def _usage(prompts: list[list[int]], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
