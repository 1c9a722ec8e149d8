"""What one request may ask of the server: the limits `hayabusa serve` sets (--max-model-len, --max-request-bytes,
--max-tokens-per-request), checked where a request enters. A body too big is refused before it is read whole
(413); a prompt past the context or a request that would cost too many tokens once its prompts are encoded (400).
Each refusal names the flag that sets the limit, so whoever reads it knows what the operator chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from hayabusa.engine.server.cli import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_PER_REQUEST
from hayabusa.engine.server.protocol import APIError


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # prompt tokens + max_tokens, per prompt
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tokens_per_request: int = DEFAULT_MAX_TOKENS_PER_REQUEST

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_request_bytes", "max_tokens_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    async def read_body(self, request: Request) -> bytes:
        """The whole body, or a 413 as soon as it is known to be too big: at once from Content-Length, else once
        that many bytes arrived. The connection closes after a 413 (the rest of the body is never read)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(f"{int(declared)} bytes", limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(f"more than {limit} bytes", limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_completion(self, prompts: list[list[int]], max_tokens: int, num_sequences: int) -> None:
        """400 for a prompt past --max-model-len, or for a request whose prompts and sequences (n, best_of or
        num_beams of them per prompt, each up to max_tokens) cost more than --max-tokens-per-request."""
        for index, prompt in enumerate(prompts):
            total = len(prompt) + max_tokens
            if total > self.max_model_len:
                which = f"prompt {index}: " if len(prompts) > 1 else ""
                alone = len(prompt) > self.max_model_len
                raise APIError(400, f"{which}{len(prompt)} prompt tokens + max_tokens {max_tokens} = {total} exceed "
                                    f"the context length {self.max_model_len} (--max-model-len)"
                                    + ("; the prompt alone is longer than that" if alone else ""),
                               param="prompt" if alone else "max_tokens", code="context_length_exceeded")
        prompt_tokens = sum(len(p) for p in prompts)
        cost = prompt_tokens + len(prompts) * num_sequences * max_tokens
        if cost > self.max_tokens_per_request:
            raise APIError(400, f"the request may cost {cost} tokens ({prompt_tokens} prompt tokens in "
                                f"{len(prompts)} prompt(s), each with {num_sequences} sequence(s) of up to max_tokens "
                                f"{max_tokens}: n, best_of and num_beams count); this server allows "
                                f"{self.max_tokens_per_request} per request (--max-tokens-per-request)",
                           param="max_tokens", code="request_too_large")


def body_too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"the request body is {size}; this server accepts at most {limit} (--max-request-bytes)",
                    code="request_too_large", headers={"Connection": "close"})
