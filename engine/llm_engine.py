"""`PagedEngine`: continuous batching over a paged KV cache on the kernels (the "triton" backend of `Engine`).

Data flows one way: request -> Sequence -> Scheduler (blocks from the BlockManager) -> ModelRunner (FastModel)
-> sample_next_tokens -> Sequence (OutputBuilder: text deltas, stopping).

Threads: any number of threads may call `generate`, `stream` or `add_request` at once. There is no background
thread; a caller waiting for its results drives the engine (one step at a time, one driver at a time), and
every step serves every running request, whoever submitted it. Submissions never wait for the model: the lock
guarding the queues is released while the model runs.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from hayabusa.engine.block_manager import BlockManager
from hayabusa.engine.config import ModelConfig
from hayabusa.engine.fast_model import FastModel, load_ops
from hayabusa.engine.model_runner import ModelRunner
from hayabusa.engine.outputs import GenerationOutput, OutputBuilder, Timings
from hayabusa.engine.sampling import SamplingParams, sample_next_tokens
from hayabusa.engine.scheduler import Scheduler
from hayabusa.engine.sequence import Sequence
from hayabusa.engine.weights import EMBED_IN
from hayabusa.tokenizer import Tokenizer

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


class PagedEngine:
    def __init__(self, config: ModelConfig, state_dict: dict[str, Tensor], tokenizer: Tokenizer, *,
                 device: torch.device | str, kv_cache_blocks: int | None = None, block_size: int = 16,
                 ops: str = "triton", max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 cuda_graphs: bool = True) -> None:
        """state_dict: the loader's HF-named weights, all in one dtype on `device` (they are used in place).

        ops: "triton" (the kernels) or "torch" (their plain-PyTorch references). kv_cache_blocks: the pool size
        in blocks of block_size tokens; None sizes it from free GPU memory. cuda_graphs: capture the decode
        step (CUDA devices only).
        """
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        embed = state_dict.get(EMBED_IN)
        if embed is not None and embed.device.type != self.device.type:
            raise ValueError(f"the weights are on {embed.device}, but device={self.device} was asked for")
        max_model_len = config.max_position_embeddings
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len)
        self.model = FastModel(config, state_dict, load_ops(ops))
        self.runner = ModelRunner(self.model, block_size=block_size, num_kv_blocks=kv_cache_blocks,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  gpu_memory_utilization=gpu_memory_utilization, use_cuda_graphs=cuda_graphs)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
        self._seq_ids = itertools.count()
        self._cond = threading.Condition()  # guards the scheduler and every Sequence; notified after each step
        self._driving = False  # a thread is inside step()

    # ---- submission ------------------------------------------------------------------------------------------

    def _new_sequence(self, prompt_ids: Seq[int], params: SamplingParams) -> Sequence:
        """Validate one request where it enters; raise ValueError naming the bad value."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = list(prompt_ids)
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token {bad[0]!r} is outside the vocabulary [0, {self.config.vocab_size})")
        self.scheduler.check_fits(len(prompt_ids), params.max_new_tokens)
        output = OutputBuilder(self.tokenizer, prompt_ids, params, self.config.eos_token_id)
        return Sequence(next(self._seq_ids), prompt_ids, params, output)

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> int:
        """Queue one request; returns its id. Raises ValueError (for this request only) if it can never run."""
        return self._submit([prompt_ids], [params])[0].seq_id

    def _submit(self, prompts: Seq[Seq[int]], params: Seq[SamplingParams]) -> list[Sequence]:
        seqs = [self._new_sequence(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        self._enqueue(seqs)
        return seqs

    def _enqueue(self, seqs: list[Sequence]) -> None:
        with self._cond:  # all at once: they can share the first prefill batch
            for seq in seqs:
                self.scheduler.add(seq)

    # ---- stepping --------------------------------------------------------------------------------------------

    def step(self) -> list[tuple[int, GenerationOutput]]:
        """Run one prefill or decode batch; returns (request id, output) of the requests that just finished."""
        self._claim_driver(lambda: False)
        try:
            return self._step()
        finally:
            self._release_driver()

    def _step(self) -> list[tuple[int, GenerationOutput]]:
        with self._cond:
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs and self.scheduler.has_work():  # a scheduler bug; fail loudly rather than spin
                raise RuntimeError(f"nothing schedulable: {len(self.scheduler.waiting)} waiting, "
                                   f"{self.block_manager.num_free_blocks} free blocks")
        if not seqs:
            return []
        try:
            logits = self.runner.run(seqs, is_prefill)  # [len(seqs), vocab] float32
            token_ids = sample_next_tokens(logits, [seq.params for seq in seqs], [seq.token_ids for seq in seqs],
                                           [seq.seed for seq in seqs],
                                           [seq.num_completion_tokens for seq in seqs]).tolist()
        except Exception as err:
            self._fail_all(f"the engine step failed: {type(err).__name__}: {err}")
            raise
        with self._cond:
            finished = self.scheduler.postprocess(seqs, token_ids)
        return [(seq.seq_id, seq.output.result()) for seq in finished]

    def _fail_all(self, message: str) -> None:
        """A step raised (e.g. out of memory): fail every queued request so that no caller waits forever."""
        with self._cond:
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler.abort(seq)
                seq.fail(message)

    def _claim_driver(self, done: Callable[[], bool]) -> bool:
        """Become the one thread that steps, unless done() (read under the lock) holds first."""
        with self._cond:
            while self._driving and not done():
                self._cond.wait()
            if done():
                return False
            self._driving = True
            return True

    def _release_driver(self) -> None:
        with self._cond:
            self._driving = False
            self._cond.notify_all()  # waiters re-check their requests; one of them may take over

    def _drive_until(self, done: Callable[[], bool]) -> None:
        """Step, or wait for the thread that is stepping, until done() holds."""
        while self._claim_driver(done):
            try:
                self._step()
            finally:
                self._release_driver()

    def has_unfinished_requests(self) -> bool:
        with self._cond:
            return self.scheduler.has_work()

    # ---- public generation -----------------------------------------------------------------------------------

    def generate(self, prompts: Seq[Seq[int]], params: Seq[SamplingParams]) -> list[GenerationOutput]:
        """One output per prompt, in order. A request that can never run gets an output with finish_reason
        "error" and the reason in .error while the others run; a failing engine step raises RuntimeError."""
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        seqs: list[Sequence | GenerationOutput] = []
        for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                seqs.append(self._new_sequence(prompt, p))
            except ValueError as err:
                seqs.append(_failed_output(list(prompt), f"request {index}: {err}"))
        live = [seq for seq in seqs if isinstance(seq, Sequence)]
        self._enqueue(live)
        self._drive_until(lambda: all(seq.is_finished for seq in live))
        return [seq if isinstance(seq, GenerationOutput) else self._result(seq) for seq in seqs]

    def stream(self, prompt_ids: Seq[int], params: SamplingParams) -> Iterator[str]:
        """Yield text deltas as tokens are sampled; they join to generate()'s text. Closing the iterator early
        aborts the request and frees its blocks. Raises ValueError at once for a request that can never run."""
        (seq,) = self._submit([prompt_ids], [params])
        return self._stream(seq)

    def _stream(self, seq: Sequence) -> Iterator[str]:
        try:
            while True:
                self._drive_until(lambda: bool(seq.text_deltas) or seq.is_finished)
                with self._cond:
                    deltas, seq.text_deltas = seq.text_deltas, []
                    finished = seq.is_finished
                yield from deltas
                if finished:
                    break
            self._result(seq)  # raises if the request failed
        finally:
            if not seq.is_finished:
                self._abort(seq)

    def _abort(self, seq: Sequence) -> None:
        with self._cond:
            while self._driving:  # never pull a sequence out of a batch that is running
                self._cond.wait()
            if not seq.is_finished:
                self.scheduler.abort(seq)
                seq.fail("aborted")

    @staticmethod
    def _result(seq: Sequence) -> GenerationOutput:
        if seq.error is not None:
            raise RuntimeError(f"request {seq.seq_id} failed: {seq.error}")
        return seq.output.result()

    def close(self) -> None:
        """Release the KV pool and graphs; the engine cannot be used afterwards."""
        with self._cond:
            self.runner.graphs.clear()
            self.runner.kv_caches.clear()


def _failed_output(prompt_ids: list[int], message: str) -> GenerationOutput:
    return GenerationOutput(text="", token_ids=[], finish_reason="error", prompt_token_ids=prompt_ids,
                            timings=Timings(prompt_tokens=len(prompt_ids), generated_tokens=0,
                                            time_to_first_token_s=0.0, total_s=0.0), error=message)
