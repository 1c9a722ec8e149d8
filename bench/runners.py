"""The engines under test behind one interface: load the checkpoint, generate forced-length greedy tokens.

Every runner gets the same model directory, dtype, device and token-id prompts, and must return exactly the
number of tokens asked for (end-of-sequence ignored), so engines are timed on identical work. transformers is
imported lazily: it is a test/bench-only dependency, and a missing one only skips its engines.
"""

from __future__ import annotations

import gc
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path

import torch

PAD_TOKEN_ID = 0  # left padding for transformers' batched generate on a mixed-length set; masked out


class EngineUnavailable(RuntimeError):
    """This engine cannot run here (missing package, wrong device); the message is recorded as the reason."""


class ForcedLengthError(RuntimeError):
    """An engine stopped early or ran long: its timing would not be comparable."""


class BenchRunner(ABC):
    name: str

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.model_dir, self.dtype, self.device = model_dir, dtype, device

    @abstractmethod
    def load(self) -> None:
        """Read the checkpoint into a ready-to-generate model on the device."""

    @abstractmethod
    def unload(self) -> None:
        """Drop the model and give its device memory back."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> int:
        """Greedy-generate gen_lens[i] tokens after prompts[i]; return how many tokens the engine computed
        (more than sum(gen_lens) when an engine must run a whole batch to its longest request)."""

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class HayabusaRunner(BenchRunner):
    """hayabusa's Engine with the Triton backend ("hayabusa") or the plain-PyTorch one ("hayabusa-reference")."""

    def __init__(self, name: str, backend: str, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(model_dir, dtype, device)
        self.name, self.backend = name, backend
        try:
            from hayabusa.engine.api import Engine
            from hayabusa.engine.sampling import SamplingParams
        except ImportError as err:
            raise EngineUnavailable(f"hayabusa.engine is not importable: {err}") from None
        self._engine_cls, self._params_cls = Engine, SamplingParams
        self.engine = None

    def load(self) -> None:
        self.engine = self._engine_cls.from_pretrained(str(self.model_dir), dtype=self.dtype, device=str(self.device),
                                                       backend=self.backend)

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self._free()

    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> int:
        params = [self._params_cls(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in gen_lens]
        outputs = self.engine.generate(prompts, sampling_params=params)
        for i, (out, wanted) in enumerate(zip(outputs, gen_lens, strict=True)):
            if len(out.token_ids) != wanted:
                raise ForcedLengthError(f"{self.name}: request {i} returned {len(out.token_ids)} tokens, "
                                        f"asked for exactly {wanted} (ignore_eos=True)")
        return sum(gen_lens)


class TransformersRunner(BenchRunner):
    """transformers' generate(): eager with its dynamic cache, or a static cache + torch.compile."""

    def __init__(self, name: str, compiled: bool, model_dir: Path, dtype: torch.dtype, device: torch.device,
                 static_batch: int) -> None:
        super().__init__(model_dir, dtype, device)
        self.name, self.compiled, self.static_batch = name, compiled, static_batch
        try:
            import transformers
        except ImportError as err:
            raise EngineUnavailable(f"transformers is not installed ({err}); pip install 'hayabusa[test]'") from None
        self._transformers = transformers
        transformers.utils.logging.disable_progress_bar()  # its per-load bars would break the suite's own
        self.model = None
        if compiled:
            # Every (batch, cache length) is a new static shape; the default limit of 8 recompiles would make
            # later cases silently fall back to eager and be timed as "compiled".
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)

    def load(self) -> None:
        # Straight onto the device when accelerate is there to do it (what a transformers user would write),
        # else through host memory.
        placement = {"device_map": str(self.device)} if importlib.util.find_spec("accelerate") else {}
        model = self._transformers.AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype,
                                                                        **placement)
        self.model = model.to(self.device).eval()

    def unload(self) -> None:
        self.model = None
        if self.compiled:
            torch._dynamo.reset()
        self._free()

    def _generation_config(self, gen_len: int):
        # eos_token_id=None: no stopping criterion, exactly max_new_tokens tokens (the others force it the same way).
        config = self._transformers.GenerationConfig(max_new_tokens=gen_len, do_sample=False, eos_token_id=None,
                                                     pad_token_id=PAD_TOKEN_ID, use_cache=True)
        if self.compiled:
            config.cache_implementation = "static"
            compile_config = self._transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
            # transformers auto-compiles only on accelerators unless told otherwise; on a CPU the engine only
            # runs when asked for by name, and then it should compile there too.
            compile_config._compile_all_devices = self.device.type != "cuda"
            config.compile_config = compile_config
        return config

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], gen_lens: list[int]) -> int:
        computed = 0
        # Static batching, in submission order: each chunk runs until its longest request is done.
        for start in range(0, len(prompts), self.static_batch):
            chunk = prompts[start:start + self.static_batch]
            gen_len = max(gen_lens[start:start + self.static_batch])
            input_ids, attention_mask = self._left_padded(chunk)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=self._generation_config(gen_len))
            if out.shape != (len(chunk), input_ids.shape[1] + gen_len):
                raise ForcedLengthError(f"{self.name}: generate returned shape {tuple(out.shape)}, expected "
                                        f"{(len(chunk), input_ids.shape[1] + gen_len)}")
            computed += len(chunk) * gen_len
        return computed

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [batch, longest prompt], padding on the left as decoder-only generate needs."""
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), PAD_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def make_runner(name: str, model_dir: Path, dtype: torch.dtype, device: torch.device, static_batch: int,
                explicitly_requested: bool) -> BenchRunner:
    """The runner for engine `name`, or EngineUnavailable with the reason it is skipped on this device."""
    on_gpu = device.type == "cuda"
    if name == "hayabusa":
        if not on_gpu and not explicitly_requested:
            raise EngineUnavailable("the Triton backend needs a CUDA GPU; on a CPU Triton runs in its interpreter, "
                                    "which checks correctness, not speed (pass --engines hayabusa to force it)")
        return HayabusaRunner(name, "triton", model_dir, dtype, device)
    if name == "hayabusa-reference":
        return HayabusaRunner(name, "reference", model_dir, dtype, device)
    if name == "transformers-eager":
        return TransformersRunner(name, False, model_dir, dtype, device, static_batch)
    if name == "transformers-compile":
        if not on_gpu and not explicitly_requested:
            raise EngineUnavailable("static cache + torch.compile is benchmarked on CUDA by default: on a CPU, "
                                    "compiling every shape dominates a short run (pass --engines "
                                    "transformers-compile to force it)")
        return TransformersRunner(name, True, model_dir, dtype, device, static_batch)
    raise ValueError(f"unknown engine {name!r}")
