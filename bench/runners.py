"""The engines under test behind one interface: load the checkpoint, generate forced-length greedy tokens.

Every runner gets the same model directory, dtype, device and token-id prompts, and must return exactly the
number of tokens asked for (end-of-sequence ignored), so engines are timed on identical work. transformers is
imported lazily: it is a test/bench-only dependency, and a missing one only skips its engines.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from hayabusa.bench.roofline import DENSE_FORMATS, decode_weight_bytes
from hayabusa.engine.loading.config import ModelConfig

PAD_TOKEN_ID = 0  # left padding for transformers' batched generate on a mixed-length set; masked out
RECOMPILE_LIMIT = 256  # torch.compile recompiles per function: one per (batch, cache length) case, with room to spare


class EngineUnavailable(RuntimeError):
    """This engine cannot run here (missing package, wrong device); the message is recorded as the reason."""


class ForcedLengthError(RuntimeError):
    """An engine stopped early or ran long: its timing would not be comparable."""


@dataclass(frozen=True)
class GenerateResult:
    computed_tokens: int  # tokens the engine generated: more than requested when a static batch runs to its longest
    decode_s: float | None  # one batch: wall time from its first generated token to its last (None: several batches)


class BenchRunner(ABC):
    name: str

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        # the weights as the engine streams them (roofline.WEIGHT_FORMAT_BYTES): its decode floor's basis
        self.weight_format = DENSE_FORMATS[dtype]

    def record_facts(self) -> dict:
        """Settings every record of this engine carries (in its extra), e.g. a peer's precision settings."""
        return {}

    @property
    def quantization(self) -> str | None:
        """The loaded model's quantized weights as records name them (scheme names joined by "+"); None: dense."""
        return None

    def weight_bytes_per_step(self, config: ModelConfig, batch: int) -> int:
        """Weight bytes one decode step of `batch` sequences reads, in the format the loaded model holds them."""
        return decode_weight_bytes(config, batch, self.dtype.itemsize)

    @abstractmethod
    def load(self) -> None:
        """Read the checkpoint into a ready-to-generate model on the device."""

    @abstractmethod
    def unload(self) -> None:
        """Drop the model and give its device memory back."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> GenerateResult:
        """Greedy-generate exactly gen_lens[i] tokens after prompts[i]."""

    def start_times(self) -> tuple[float, float] | None:
        """(cold, warm) ms of a start in a fresh process, for engines that compile kernels; None otherwise."""
        return None

    def generate_prompt_lookup(self, prompts: list[list[int]], gen_lens: list[int],
                               num_draft_tokens: int) -> tuple[int, int]:
        """Greedy-generate as `generate` does, with prompt-lookup speculation of num_draft_tokens tokens; returns
        (draft tokens checked, drafts accepted) over all requests."""
        raise EngineUnavailable("prompt-lookup acceptance is measured on hayabusa's engine only")

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def static_batches(count: int, static_batch: int | None) -> list[slice]:
    """Consecutive slices of at most static_batch requests (one slice of all when None)."""
    size = static_batch or count
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


class HayabusaRunner(BenchRunner):
    """hayabusa's Engine with the Triton backend ("hayabusa": its scheduler batches all requests continuously) or
    the reference one ("hayabusa-reference": the same paged engine on the kernels' PyTorch twins, given requests
    in static batches, one generate call each, like transformers). `quantize`: a quant_schemes name to quantize the
    checkpoint with while loading (a quantized checkpoint runs quantized without it)."""

    def __init__(self, name: str, backend: str, model_dir: Path, dtype: torch.dtype, device: torch.device,
                 static_batch: int | None, kv_cache_blocks: int | None = None, quantize: str | None = None) -> None:
        super().__init__(model_dir, dtype, device)
        self.name, self.backend, self.static_batch = name, backend, static_batch
        self.kv_cache_blocks = kv_cache_blocks  # None: the engine's own sizing
        self.quantize = quantize
        try:
            from hayabusa.engine.api import Engine
            from hayabusa.engine.sampling_params import SamplingParams
        except ImportError as err:
            raise EngineUnavailable(f"hayabusa.engine is not importable: {err}") from None
        self._engine_cls, self._params_cls = Engine, SamplingParams
        self.engine = None

    def load(self) -> None:
        self.engine = self._engine_cls.from_pretrained(str(self.model_dir), dtype=self.dtype, device=str(self.device),
                                                       backend=self.backend, kv_cache_blocks=self.kv_cache_blocks,
                                                       quantization=self.quantize)
        layer_linears = self.engine.paged.model.linear_weights()[:-1]  # the LM head stays dense
        self.weight_format = "+".join(dict.fromkeys(streamed_format(weight) for weight in layer_linears))

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self._free()

    @property
    def quantization(self) -> str | None:
        return "+".join(self.engine.paged.model.weight_schemes) or None

    def weight_bytes_per_step(self, config: ModelConfig, batch: int) -> int:
        return self.engine.paged.model.weight_bytes_per_decode_step(batch)

    def start_times(self) -> tuple[float, float] | None:
        if self.backend != "triton":
            return None
        from hayabusa.bench.start_time import measure_starts

        return measure_starts(self.model_dir, self.dtype, self.device, self.backend, self.quantize)

    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> GenerateResult:
        return self._generate(prompts, gen_lens, None)[0]

    def generate_prompt_lookup(self, prompts: list[list[int]], gen_lens: list[int],
                               num_draft_tokens: int) -> tuple[int, int]:
        outputs = self._generate(prompts, gen_lens, num_draft_tokens)[1]
        return (sum(out.speculation.draft_tokens for out in outputs),
                sum(out.speculation.accepted_tokens for out in outputs))

    def _generate(self, prompts: list[list[int]], gen_lens: list[int],
                  prompt_lookup_num_tokens: int | None) -> tuple[GenerateResult, list]:
        params = [self._params_cls(max_new_tokens=n, do_sample=False, ignore_eos=True,
                                   prompt_lookup_num_tokens=prompt_lookup_num_tokens) for n in gen_lens]
        batches = static_batches(len(prompts), self.static_batch)
        outputs = []
        for batch in batches:
            outputs += self.engine.generate(prompts[batch], sampling_params=params[batch])
        for i, (out, wanted) in enumerate(zip(outputs, gen_lens, strict=True)):
            if len(out.token_ids) != wanted:
                raise ForcedLengthError(f"{self.name}: request {i} returned {len(out.token_ids)} tokens, "
                                        f"asked for exactly {wanted} (ignore_eos=True)")
        # The engine stamps each request's first and last token on the host, after the token reached it.
        decode_s = (sum(o.timings.total_s - o.timings.time_to_first_token_s for o in outputs) / len(outputs)
                    if len(batches) == 1 else None)
        if self.static_batch is None:  # paged: each request stops at its own length
            return GenerateResult(sum(gen_lens), decode_s), outputs
        # a contiguous batch steps until its longest request is done
        return GenerateResult(sum((b.stop - b.start) * max(gen_lens[b]) for b in batches), decode_s), outputs


class TransformersRunner(BenchRunner):
    """transformers' generate(): eager with its dynamic cache, or a static cache + torch.compile."""

    def __init__(self, name: str, compiled: bool, model_dir: Path, dtype: torch.dtype, device: torch.device,
                 static_batch: int) -> None:
        super().__init__(model_dir, dtype, device)
        self.name, self.compiled, self.static_batch = name, compiled, static_batch
        try:
            import transformers
        except ImportError as err:
            raise EngineUnavailable(f"transformers is not installed ({err}); pip install \"hayabusa[bench]\"") from None
        self._transformers = transformers
        transformers.utils.logging.disable_progress_bar()  # its per-load bars would break the suite's own
        transformers.utils.logging.set_verbosity_error()  # e.g. its note on each load that embeddings stay untied
        self.model = None
        self._static_cache = None  # (batch, max_len, StaticCache): one persistent cache per case (compiled only)
        if compiled:
            # Every (batch, cache length) is a new static shape; the default limit of 8 recompiles would make
            # later cases silently fall back to eager and be timed as "compiled".
            raise_recompile_limit(RECOMPILE_LIMIT)

    def load(self) -> None:
        # Straight onto the device when accelerate is there to do it (what a transformers user would write),
        # else through host memory.
        placement = {"device_map": str(self.device)} if importlib.util.find_spec("accelerate") else {}
        with warnings.catch_warnings():  # that the checkpoint's own quantization_config is used, with dequantize
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            model = self._transformers.AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype,
                                                                            **placement, **self._decompressed())
        # Forced length: a None eos in each call's config would be filled in from these defaults, so clear it here.
        model.generation_config.eos_token_id = None
        self.model = model.to(self.device).eval()

    def _decompressed(self) -> dict:
        """For a quantized (compressed-tensors) checkpoint, the option that has compressed-tensors decompress it on
        load: transformers then runs dense weights of self.dtype (transformers 5.25 with compressed-tensors 0.20
        loads an asymmetric checkpoint no other way)."""
        config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" not in config:
            return {}
        if importlib.util.find_spec("compressed_tensors") is None:
            raise EngineUnavailable("transformers needs the compressed-tensors package to load a quantized checkpoint "
                                    "(pip install compressed-tensors)")
        return {"quantization_config": self._transformers.CompressedTensorsConfig(dequantize=True)}

    def unload(self) -> None:
        self.model = None
        self._static_cache = None
        if self.compiled:
            torch._dynamo.reset()
        self._free()

    def _generation_config(self, gen_len: int):
        # eos_token_id=None: no stopping criterion, exactly max_new_tokens tokens (hayabusa runs with ignore_eos).
        config = self._transformers.GenerationConfig(max_new_tokens=gen_len, do_sample=False, eos_token_id=None,
                                                     pad_token_id=PAD_TOKEN_ID, use_cache=True)
        if self.compiled:  # the static cache itself comes from _persistent_cache
            compile_config = self._transformers.CompileConfig()  # transformers' defaults: mode reduce-overhead
            # transformers auto-compiles only on accelerators unless told otherwise; on a CPU the engine only
            # runs when asked for by name, and then it should compile there too.
            compile_config._compile_all_devices = self.device.type != "cuda"
            config.compile_config = compile_config
        return config

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> GenerateResult:
        computed, decode_s = 0, 0.0
        # Static batching, in submission order: each batch runs until its longest request is done.
        batches = static_batches(len(prompts), self.static_batch)
        for batch in batches:
            chunk, gen_len = prompts[batch], max(gen_lens[batch])
            input_ids, attention_mask = self._left_padded(chunk)
            first_token = FirstTokenClock(self.device)
            cache = {"past_key_values": self._persistent_cache(len(chunk), input_ids.shape[1] + gen_len)} \
                if self.compiled else {}
            with warnings.catch_warnings():  # newer transformers 5 renames past_key_values (the name 5.x all take)
                warnings.simplefilter("ignore", FutureWarning)
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=self._generation_config(gen_len),
                                          logits_processor=[first_token], **cache)
            if out.shape != (len(chunk), input_ids.shape[1] + gen_len):
                raise ForcedLengthError(f"{self.name}: generate returned shape {tuple(out.shape)}, expected "
                                        f"{(len(chunk), input_ids.shape[1] + gen_len)}")
            decode_s += first_token.seconds_since()
            computed += len(chunk) * gen_len
        return GenerateResult(computed, decode_s if len(batches) == 1 else None)

    def _persistent_cache(self, batch: int, max_len: int):
        """The static KV cache of this (batch, length) case, emptied: the same tensors on every call of a case, so
        the compiled step's CUDA graphs, recorded in the warm-up call, are replayed (generate() would otherwise
        make a new cache, and new graphs, per call). Sized to the case, not the model: a static cache's
        attention reads every slot."""
        if self._static_cache is None or self._static_cache[:2] != (batch, max_len):
            self._static_cache = None  # free the previous case's cache first
            cache = self._transformers.StaticCache(config=self.model.config, max_cache_len=max_len)
            self._static_cache = (batch, max_len, cache)
        cache = self._static_cache[2]
        cache.reset()
        return cache

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [batch, longest prompt], padding on the left as decoder-only generate needs."""
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), PAD_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def raise_recompile_limit(limit: int) -> str | None:
    """Let torch.compile recompile a function at least `limit` times before it falls back to eager. Older torch
    calls the setting cache_size_limit, newer recompile_limit: whichever this torch has is raised; its name, or None
    when it has neither (then torch's own limit holds)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
            return name
    return None


class FirstTokenClock:
    """A logits processor that only notes when generate() first calls it: the prefill is done and the first
    token is about to be chosen. One device synchronize per generate call, none per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self._sync()
            self.at = time.perf_counter()
        return scores

    def seconds_since(self) -> float:
        """Seconds from the first call to now, device work included."""
        if self.at is None:
            raise RuntimeError("generate() never called its logits processors")
        self._sync()
        return time.perf_counter() - self.at

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def streamed_format(weight: object) -> str:
    """The format a loaded linear weight is read in each step: "int8" / "int4" codes, or its dense dtype's name (a
    CPU runs an int8 weight in groups dequantized: kernels/cpu_linear.py)."""
    from hayabusa.kernels.cpu_linear import PackedLinearWeight
    from hayabusa.kernels.quantized_weight import QuantizedWeight

    if isinstance(weight, QuantizedWeight):
        return f"int{weight.bits}"
    if isinstance(weight, PackedLinearWeight):
        return {"int4pack": "int4", "int8pack": "int8"}.get(weight.kind) or DENSE_FORMATS[weight.dtype]
    return DENSE_FORMATS[weight.dtype]


OPENVINO_ENGINES = ("openvino", "openvino-int8", "openvino-int4")  # bench/openvino_runner.py


def make_runner(name: str, model_dir: Path, dtype: torch.dtype, device: torch.device, static_batch: int,
                explicitly_requested: bool, kv_cache_blocks: int | None = None,
                quantize: str | None = None) -> BenchRunner:
    """The runner for engine `name`, or EngineUnavailable with the reason it is skipped on this device.
    kv_cache_blocks: the KV pool of hayabusa's CPU engine (None: its default). quantize: hayabusa's engines
    quantize the checkpoint with this quant_schemes name while loading (transformers' engines run it as stored)."""
    on_gpu = device.type == "cuda"
    if name == "hayabusa":
        if not on_gpu and not explicitly_requested:
            raise EngineUnavailable("the Triton backend needs a CUDA GPU; on a CPU Triton runs in its interpreter, "
                                    "which checks correctness, not speed (pass --engines hayabusa to force it)")
        return HayabusaRunner(name, "triton", model_dir, dtype, device, static_batch=None, quantize=quantize)
    if name == "hayabusa-reference":
        return HayabusaRunner(name, "reference", model_dir, dtype, device, static_batch, kv_cache_blocks, quantize)
    if name == "transformers-eager":
        return TransformersRunner(name, False, model_dir, dtype, device, static_batch)
    if name == "transformers-compile":
        if not on_gpu and not explicitly_requested:
            raise EngineUnavailable("static cache + torch.compile is benchmarked on CUDA by default: on a CPU, "
                                    "compiling every shape dominates a short run (pass --engines "
                                    "transformers-compile to force it)")
        return TransformersRunner(name, True, model_dir, dtype, device, static_batch)
    if name in OPENVINO_ENGINES:
        from hayabusa.bench.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(name, model_dir, device, static_batch)
    raise ValueError(f"unknown engine {name!r}")
