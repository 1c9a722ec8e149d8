"""`Engine`: the public entry point. Loads a model once and generates with the chosen backend.

Both backends run the same paged engine (continuous batching, paged KV cache, prefix caching, preemption,
streaming, threads): backend="triton" on the Triton kernels (a CUDA device, or the CPU under TRITON_INTERPRET=1
for tests), backend="reference" on their plain-PyTorch twins (any device, the CPU default). `Engine.logits` runs
the reference model (engine.oracle.reference_model), the oracle both are checked against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from hayabusa.engine.core.request_checks import check_request, check_score_pair, check_token_ids
from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.quant_schemes import scheme_named
from hayabusa.engine.loading.tensor_names import EMBED_IN, LinearWeight
from hayabusa.engine.loading.weights import load_model_files
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.outputs import GenerationOutput, ScoreOutput
from hayabusa.engine.platform.cpu_threads import ThreadChoice, apply_cpu_threads
from hayabusa.engine.platform.devices import resolve_device, warn_if_interpreted
from hayabusa.engine.platform.dtypes import AUTO, auto_dtype
from hayabusa.engine.sampling_params import SCORING, SamplingParams
from hayabusa.tokenizer import Tokenizer

Prompt = str | Sequence[int]
OPS_OF_BACKEND = {"reference": "torch", "triton": "triton"}  # the PagedEngine op set each backend runs
BACKENDS = tuple(OPS_OF_BACKEND)


def default_dtype(device: torch.device) -> torch.dtype:
    """What an omitted dtype means (`--dtype auto`): engine.platform.dtypes.auto_dtype."""
    return auto_dtype(device)


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "reference"


def default_warmup(device: torch.device, backend: str) -> bool:
    """Compile every kernel shape up front where kernels compile: the triton backend on CUDA."""
    return device.type == "cuda" and backend == "triton"


def load_pretrained(name_or_path: str | Path, *, dtype: torch.dtype | None, device: torch.device,
                    revision: str | None = None, quantization: str | None = None
                    ) -> tuple[Path, ModelConfig, dict[str, LinearWeight], Tokenizer]:
    """(model directory, config, weights on `device` in `dtype` (default: default_dtype), tokenizer) of a local
    directory, a hub id or a random preset name; `quantization` (a quant_schemes name: int8, int4, W4A16, ...)
    quantizes every layer's Linear weights while loading."""
    scheme = None if quantization is None else scheme_named(quantization)  # a bad name fails before the download
    model_dir, config, state_dict = load_model_files(str(name_or_path), dtype=dtype or default_dtype(device),
                                                     device=device, revision=revision, quantization=scheme)
    return model_dir, config, state_dict, Tokenizer.from_pretrained(str(model_dir))


class Engine:
    def __init__(self, config: ModelConfig, state_dict: dict[str, LinearWeight], tokenizer: Tokenizer, *,
                 backend: str, device: torch.device, kv_cache_blocks: int | None = None, block_size: int = 16,
                 model_dir: Path | None = None, warmup: bool = False, max_num_batched_tokens: int | None = None,
                 quantization: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = device = torch.device(device)
        self.model_dir = model_dir
        self.quantization = quantization  # the quant_schemes name model_dir was quantized with while loading
        # On a CPU: torch's thread count for this model (process-wide; see platform/cpu_threads.py). None on a GPU.
        self.cpu_threads: ThreadChoice | None = None
        if device.type == "cpu":
            self.cpu_threads = apply_cpu_threads(config, state_dict[EMBED_IN].dtype)
        self.dtype = state_dict[EMBED_IN].dtype
        self._reference: ReferenceModel | None = None  # serves logits(); built on first use (see `reference`)
        if backend == "triton":
            warn_if_interpreted(torch.device(device), "the reference backend generates on a CPU at full speed")
        from hayabusa.engine.core.paged_engine import PagedEngine  # here: importing the API stays light (no kernels)

        # add_request / abort / step / stats for a serving loop (see PagedEngine)
        self.paged = PagedEngine(config, state_dict, tokenizer, device=device, ops=OPS_OF_BACKEND[backend],
                                 kv_cache_blocks=kv_cache_blocks, block_size=block_size, warmup=warmup,
                                 max_num_batched_tokens=max_num_batched_tokens)
        # The loaded weights stay for the reference while the paged model reads them in place; where it packed its
        # own copy (a CPU) and the directory can be read again, they are let go (the memory of a second model).
        reloadable = model_dir is not None and self.paged.model.owns_weights
        self._reference_weights: dict[str, torch.Tensor] | None = None if reloadable else state_dict

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, backend: str | None = None,
                        kv_cache_blocks: int | None = None, block_size: int = 16,
                        revision: str | None = None, warmup: bool | None = None,
                        max_num_batched_tokens: int | None = None, quantization: str | None = None) -> Engine:
        """Load a local model directory, a hub id (e.g. "abeja/gpt-neox-japanese-2.7b") or a random preset.

        A preset name (tiny, small, 2.7b) that is not a local directory loads a random-weight checkpoint of that
        shape, written once into the cache ($HAYABUSA_CACHE or ~/.cache/hayabusa).

        Defaults: device cuda when available else cpu; dtype (None or "auto") float16 on cuda, on a cpu bfloat16
        where it computes bf16 natively (avx512_bf16 or AMX), else float32 (engine.platform.dtypes; float32 is
        the exact path); backend triton on cuda, reference on cpu. warmup (default: with the triton backend on
        cuda) runs every kernel shape the engine can launch before returning, with a progress bar, so that no
        request waits for a compile.
        max_num_batched_tokens: tokens per engine step (default 512): prompts run in chunks of what the decoding
        requests leave of it, so it bounds how long they wait for their next token when a long prompt arrives.
        quantization: quantize the weights of every layer's Linear layers while loading, round to nearest: "int8"
        (= "W8A16_CHANNEL", one scale per output channel), "int4" (= "W4A16", groups of 128, symmetric), "W8A16" or
        "W4A16_ASYM"; a quantized checkpoint (compressed-tensors, as llm-compressor writes it) loads as stored
        without it.
        """
        device = resolve_device(device)  # before anything loads: a bad device fails in a second, not after the weights
        if dtype == AUTO:
            dtype = None
        elif dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, {AUTO!r} or None, got {dtype!r}")
        if backend is None:
            backend = default_backend(device)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        model_dir, config, state_dict, tokenizer = load_pretrained(name_or_path, dtype=dtype, device=device,
                                                                   revision=revision, quantization=quantization)
        if warmup is None:
            warmup = default_warmup(device, backend)
        return cls(config, state_dict, tokenizer, backend=backend, device=device, kv_cache_blocks=kv_cache_blocks,
                   block_size=block_size, model_dir=model_dir, warmup=warmup,
                   max_num_batched_tokens=max_num_batched_tokens, quantization=quantization)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs: Any) -> list[GenerationOutput]:
        """Generate for one prompt or a list of prompts (strings or token-id lists): num_return_sequences outputs
        per prompt (default 1), each prompt's consecutively, in prompt order.

        Sampling options come as a SamplingParams (one, or one per prompt) or as keyword arguments with its field
        names, which are transformers' generate options (README: generate options): max_new_tokens, do_sample,
        temperature, top_k, top_p, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
        min_new_tokens, eos_token_id, seed, stop, ignore_eos, num_return_sequences, prompt_lookup_num_tokens,
        max_matching_ngram_size, num_beams, length_penalty, early_stopping; and OpenAI's logprobs, presence_penalty,
        frequency_penalty, logit_bias, best_of, with vLLM's prompt_logprobs.
        """
        prompt_ids = self._encode_prompts(prompts)
        params = self._sampling_params(sampling_params, kwargs, len(prompt_ids))
        for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
            self._check_request("prompt", i, ids, p)
        return self.paged.generate(prompt_ids, params, checked=True)

    def score(self, contexts: Prompt | Sequence[Prompt], continuations: Prompt | Sequence[Prompt]) -> list[ScoreOutput]:
        """The log-likelihood of each continuation given its context (pairs: one context per continuation, or one
        pair of strings / token-id lists), from the model's raw logits: its sum, per token, and whether each token
        is the greedy pick. Strings are encoded separately, so the continuation's tokens are exactly its own
        encoding (pass token ids to choose the split). All pairs run batched; shared contexts hit the prefix cache.
        """
        context_ids = self._encode_prompts(contexts, "context")
        continuation_ids = self._encode_prompts(continuations, "continuation")
        if len(context_ids) != len(continuation_ids):
            raise ValueError(f"got {len(context_ids)} contexts but {len(continuation_ids)} continuations")
        for i, (context, continuation) in enumerate(zip(context_ids, continuation_ids, strict=True)):
            self._check_request("pair", i, context + continuation, SCORING, (context, continuation))
        return self.paged.score(list(zip(context_ids, continuation_ids, strict=True)), checked=True)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield text deltas for one prompt as tokens are generated; they join to generate()'s text (one
        completion: num_return_sequences must be 1)."""
        (ids,) = self._encode_prompts([prompt])
        (params,) = self._sampling_params(sampling_params, kwargs, 1)
        self._check_request("prompt", 0, ids, params)
        if params.num_beams > 1:
            raise ValueError("num_beams > 1 does not stream: beam search knows its outputs only at the end (as in "
                             "transformers); use generate")
        yield from self.paged.stream(ids, params, checked=True)

    def logits(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Full forward of the reference model: LongTensor [batch, seq] -> float32 logits [batch, seq, vocab]."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
        check_token_ids("input_ids", input_ids.flatten().tolist(), self.config.vocab_size)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids hold {input_ids.shape[1]} tokens; max_position_embeddings is "
                             f"{self.config.max_position_embeddings}")
        return self.reference(input_ids.to(self.device))

    @property
    def reference(self) -> ReferenceModel:
        """The reference model on this engine's checkpoint (the oracle the fast path is checked against), built on
        first use: on the weights the paged model reads, or, where the paged model packed its own copy, on the
        weights read again from the model directory."""
        if self._reference is None:
            state_dict = self._reference_weights
            if state_dict is None:
                scheme = None if self.quantization is None else scheme_named(self.quantization)
                _, _, state_dict = load_model_files(str(self.model_dir), dtype=self.dtype, device=self.device,
                                                    quantization=scheme)
            self._reference = ReferenceModel(self.config, state_dict)
        return self._reference

    def close(self) -> None:
        self.paged.close()

    def _encode_prompts(self, prompts: Prompt | Sequence[Prompt], what: str = "prompt") -> list[list[int]]:
        """Token ids of each text; what: how errors name the texts (prompt, context, continuation). The ids are
        checked against the model with the rest of the request (_check_request)."""
        _refuse_bytes(f"{what}s", prompts)
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"{what}s must be a string, a list of token ids, or a non-empty list of those")
        encoded = []
        for i, prompt in enumerate(prompts):
            _refuse_bytes(f"{what} {i}", prompt)
            if isinstance(prompt, str):
                encoded.append(self.tokenizer.encode(prompt))
            elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
                encoded.append(list(prompt))
            else:
                raise ValueError(f"{what} {i} must be a string or a list of token ids, got {type(prompt).__name__}")
        return encoded

    @staticmethod
    def _sampling_params(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                         kwargs: dict[str, Any], count: int) -> list[SamplingParams]:
        unknown = sorted(set(kwargs) - {f.name for f in fields(SamplingParams)})
        if unknown:
            raise ValueError(f"unknown sampling parameter {unknown[0]!r}; known: "
                             f"{', '.join(f.name for f in fields(SamplingParams))}")
        if sampling_params is None:
            return [SamplingParams(**kwargs)] * count
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
        return [replace(p, **kwargs) if kwargs else p for p in sampling_params]

    def _check_request(self, what: str, index: int, prompt_ids: list[int], params: SamplingParams,
                       pair: tuple[list[int], list[int]] | None = None) -> None:
        """Check a request against the model before any work starts (the paged engine then checks only that its
        pool and batch can hold it); errors name which request (what: prompt or pair) it was. pair: a score()
        request's (context, continuation)."""
        try:
            if pair is not None:
                check_score_pair(*pair)
            check_request(prompt_ids, params, vocab_size=self.config.vocab_size,
                          max_model_len=self.config.max_position_embeddings)
        except ValueError as err:
            raise ValueError(f"{what} {index}: {err}") from None


def _refuse_bytes(what: str, value: object) -> None:
    """bytes iterate as ints, so without this check b"..." would pass for a list of token ids."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} is {type(value).__name__}; pass text as str (e.g. data.decode('utf-8')) or token ids "
                         f"as a list of int")
