"""POST /tokenize, POST /detokenize and GET /tokenizer_info, in the shapes vLLM gives them (evaluation harnesses
that find them tokenize on the server instead of loading the tokenizer themselves).

This tokenizer adds no special tokens to a text (GPT-NeoX-Japanese has no BOS in its prompts), so
`add_special_tokens` is accepted for vLLM's clients and changes nothing; `token_strs` are the vocabulary's pieces
(`<|byte12|>`, `<SP>`), as transformers' convert_ids_to_tokens gives them.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import BaseModel, ConfigDict, WithJsonSchema

from hayabusa.engine.server.protocol import TOKEN_ID_SCHEMA, APIError, StrictRequest, model_not_found
from hayabusa.tokenizer import Tokenizer

TOKENIZER_CLASS = "GPTNeoXJapaneseTokenizer"  # transformers' name, which tokenizer_config.json gives


class TokenizeRequest(StrictRequest):
    model: str | None = None  # None: the served model
    prompt: str
    add_special_tokens: bool = True  # vLLM's field; this tokenizer adds none either way
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the server's --max-model-len
    tokens: list[int]
    token_strs: list[str] | None  # when return_token_strs asked for them


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: list[Annotated[int, WithJsonSchema(TOKEN_ID_SCHEMA)]]


class DetokenizeResponse(BaseModel):
    prompt: str  # the text of the tokens


class TokenizerInfo(BaseModel):
    """What the model's tokenizer_config.json says, as vLLM's /tokenizer_info gives it, with the special tokens'
    ids and the vocabulary's size."""

    model_config = ConfigDict(extra="forbid")

    tokenizer_class: str
    bos_token: str
    eos_token: str
    unk_token: str
    pad_token: str
    bos_token_id: int
    eos_token_id: int
    unk_token_id: int
    pad_token_id: int
    vocab_size: int
    model_max_length: int  # the server's --max-model-len
    do_clean_text: bool  # whether encoding replaces URLs, e-mail addresses, dates, prices by tags


class TokenizationServing:
    def __init__(self, tokenizer: Tokenizer, *, model_name: str, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    async def tokenize(self, body: bytes) -> TokenizeResponse:
        request = TokenizeRequest.parse(body)
        self._check_model(request.model)
        # a long text takes a while: off the event loop, so streams keep flowing
        tokens = await asyncio.to_thread(self.tokenizer.encode, request.prompt)
        token_strs = self.tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens,
                                token_strs=token_strs)

    async def detokenize(self, body: bytes) -> DetokenizeResponse:
        request = DetokenizeRequest.parse(body)
        self._check_model(request.model)
        vocab_size = self.tokenizer.vocab_size
        outside = [(i, t) for i, t in enumerate(request.tokens) if not 0 <= t < vocab_size]
        if outside:
            position, token = outside[0]
            raise APIError(400, f"'tokens.{position}': {token} is not a token id of this model (the vocabulary is "
                                f"[0, {vocab_size}))", param=f"tokens.{position}")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self.tokenizer.decode, request.tokens))

    def info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(tokenizer_class=TOKENIZER_CLASS, bos_token=t.bos_token, eos_token=t.eos_token,
                             unk_token=t.unk_token, pad_token=t.pad_token, bos_token_id=t.bos_token_id,
                             eos_token_id=t.eos_token_id, unk_token_id=t.unk_token_id, pad_token_id=t.pad_token_id,
                             vocab_size=t.vocab_size, model_max_length=self.max_model_len,
                             do_clean_text=t.do_clean_text)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model, self.model_name)
