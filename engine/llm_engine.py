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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RequestUpdate:
    """What one step did for one request."""

    request_id: int
    new_token_ids: list[int]  # tokens that became known this step
    text_delta: str  # text that became final this step (stop strings held back until resolved)
    finished: GenerationOutput | None  # the final output on the request's last update, else None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int


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
        self._live: dict[int, Sequence] = {}  # request id -> its unfinished sequence
        self._abort_ids: set[int] = set()  # aborts asked for; applied at the start of the next step

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
                self._live[seq.seq_id] = seq

    def abort(self, request_id: int) -> None:
        """Ask to drop a request (any thread, never waits for a step). The next step frees its blocks and returns
        its last update, finish_reason "abort". Unknown or finished ids are ignored."""
        with self._cond:
            if request_id in self._live:
                self._abort_ids.add(request_id)

    # ---- stepping --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestUpdate]:
        """Apply pending aborts, run one prefill or decode batch; returns the update of every request that got
        tokens or finished in it."""
        self._claim_driver(lambda: False)
        try:
            return self._step()
        finally:
            self._release_driver()

    def _step(self) -> list[RequestUpdate]:
        with self._cond:
            # An id may have finished on its own since abort() was called.
            updates = [self._apply_abort(self._live[i]) for i in self._abort_ids if i in self._live]
            self._abort_ids.clear()
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs and self.scheduler.has_work():  # a scheduler bug; fail loudly rather than spin
                raise RuntimeError(f"nothing schedulable: {len(self.scheduler.waiting)} waiting, "
                                   f"{self.block_manager.num_free_blocks} free blocks")
        if not seqs:
            return updates
        try:
            logits = self.runner.run(seqs, is_prefill)  # [len(seqs), vocab] float32
            token_ids = sample_next_tokens(logits, [seq.params for seq in seqs], [seq.token_ids for seq in seqs],
                                           [seq.seed for seq in seqs],
                                           [seq.num_completion_tokens for seq in seqs]).tolist()
        except Exception as err:
            self._fail_all(f"the engine step failed: {type(err).__name__}: {err}")
            raise
        with self._cond:
            num_deltas = [len(seq.text_deltas) for seq in seqs]  # a stream() reader takes them under this lock
            self.scheduler.postprocess(seqs, token_ids)
            for seq, token_id, num_before in zip(seqs, token_ids, num_deltas, strict=True):
                finished = None
                if seq.is_finished:
                    del self._live[seq.seq_id]
                    finished = seq.output.result()
                updates.append(RequestUpdate(seq.seq_id, [token_id], "".join(seq.text_deltas[num_before:]),
                                             finished))
        return updates

    def _apply_abort(self, seq: Sequence) -> RequestUpdate:
        """Under the lock, outside a running batch: drop seq and build its last update."""
        self.scheduler.abort(seq)
        seq.fail("aborted")
        del self._live[seq.seq_id]
        output = _failed_output(seq.token_ids[: seq.num_prompt_tokens], "aborted", finish_reason="abort",
                                token_ids=seq.token_ids[seq.num_prompt_tokens:])
        return RequestUpdate(seq.seq_id, [], "", output)

    def _fail_all(self, message: str) -> None:
        """A step raised (e.g. out of memory): fail every queued request so that no caller waits forever."""
        with self._cond:
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler.abort(seq)
                seq.fail(message)
            self._live.clear()
            self._abort_ids.clear()

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

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                               num_free_blocks=self.block_manager.num_free_blocks,
                               num_blocks=self.block_manager.num_blocks)

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
                self._live.pop(seq.seq_id, None)

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


def _failed_output(prompt_ids: list[int], message: str, *, finish_reason: str = "error",
                   token_ids: list[int] | None = None) -> GenerationOutput:
    token_ids = token_ids or []
    return GenerationOutput(text="", token_ids=token_ids, finish_reason=finish_reason, prompt_token_ids=prompt_ids,
                            timings=Timings(prompt_tokens=len(prompt_ids), generated_tokens=len(token_ids),
                                            time_to_first_token_s=0.0, total_s=0.0), error=message)
