"""`PagedEngine`: continuous batching over a paged KV cache, on the kernels (ops="triton") or on their plain-PyTorch
references (ops="torch"); both backends of `Engine` run it.

Data flows one way, each stage handing the next a value and never calling back: a request is checked once and becomes a
Sequence (add_request, generate, stream, score; engine.core.request_checks) -> the Scheduler plans a step (blocks,
slots) and hands the worker a StepPlan -> the ModelRunner launches it (PagedModel and SlotSampler on the device) and,
one step later, hands back a StepResult (sampled ids) -> the OutputProcessor applies it to the sequences (tokens,
logprobs, OutputBuilder's text deltas and stop rules, beam steps) and returns StepOutputs -> the Scheduler frees what
ended and updates its blocks -> this loop turns the updates into RequestUpdates, stream deltas or final outputs.

The host stays off the device's critical path: `step()` plans step N, launches it (it needs nothing from the host
about step N-1: the sampled ids are already in the next step's input buffer on the device), and only then reads
step N-1's ids back and processes them (append, detokenize, stop checks, free blocks) while the device runs step
N. On a CPU the same code runs, each launch simply finishing before it returns. Stop conditions are exact despite
the lag (see engine.core.scheduler): a stopped sequence's extra row is discarded and never reaches its output.

A request of num_return_sequences = n completions runs as n sequences: the first computes the prompt, and the
other n - 1 are forked from it when it is admitted (they share its prompt's KV blocks, wait while its prompt runs in
chunks, and sample their first tokens from its logits, each with its own seed, see engine.sample.seeds.
completion_seed). Its updates carry the completion's `index`. A request of num_beams beams runs the same way as a
beam group (engine.decoding.paged_beams), whose best num_return_sequences hypotheses are its outputs, and so does a
request of best_of candidates (engine.decoding.best_of), whose best num_return_sequences are handed out whole once
all of them ended.

Threads: any number of threads may call add_request, abort, step, generate, stream and stats at once. There is no
background thread: a caller waiting for results drives the engine (one step at a time, one driver at a time), and
every step serves every running request, whoever submitted it. The lock guarding the queues is not held while
the device runs or while the driver waits for results, so submissions never wait for the model.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from hayabusa.engine.core.block_manager import BlockManager
from hayabusa.engine.core.output_processor import OutputProcessor, Update
from hayabusa.engine.core.request_checks import check_capacity, check_request, check_score_pair
from hayabusa.engine.core.scheduler import Scheduler
from hayabusa.engine.core.sequence import Delivery, Sequence, SequenceStatus
from hayabusa.engine.decoding.best_of import CandidateGroup
from hayabusa.engine.decoding.paged_beams import BeamGroup
from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.tensor_names import EMBED_IN
from hayabusa.engine.model.op_sets import load_ops
from hayabusa.engine.model.paged_model import PagedModel
from hayabusa.engine.outputs import EngineStats, GenerationOutput, OutputBuilder, RequestUpdate, ScoreOutput, Timings
from hayabusa.engine.sample.grammars import GrammarCompiler
from hayabusa.engine.sample.seeds import completion_seed
from hayabusa.engine.sampling_params import SCORING, SamplingParams, eos_token_ids
from hayabusa.engine.worker.model_runner import InFlight, ModelRunner, StepResult
from hayabusa.tokenizer import Tokenizer

DEFAULT_MAX_NUM_SEQS = 256
# Tokens per step: with chunked prefill a step's prompt chunks fill what the decode rows leave of it, so it bounds how
# long a running request can wait for its next token; without, whole prompts of up to this many tokens run at once.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
DEFAULT_MAX_NUM_BATCHED_TOKENS_UNCHUNKED = 8192


class PagedEngine:
    def __init__(self, config: ModelConfig, state_dict: dict[str, Tensor], tokenizer: Tokenizer, *,
                 device: torch.device | str, kv_cache_blocks: int | None = None, block_size: int = 16,
                 ops: str = "triton", max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 cuda_graphs: bool = True, warmup: bool = False, chunked_prefill: bool = True) -> None:
        """state_dict: the loader's HF-named weights, all in one dtype on `device` (they are used in place).

        ops: "triton" (the kernels) or "torch" (their plain-PyTorch references). kv_cache_blocks: the pool size in
        blocks of block_size tokens; None sizes it from free memory. cuda_graphs: capture the decode step (the
        triton op set on CUDA; capturing runs every decode batch size once). warmup: also run every prefill shape
        up front (ModelRunner.warm_up), so no request waits for a kernel compile. max_num_batched_tokens: tokens
        per step (default 512 with chunked prefill, else max(8192, the context length)). chunked_prefill: split
        prompts into chunks that run in the same step as the decodes (engine.core.scheduler); False: a prompt runs
        whole, in a step of prefills only.
        """
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        embed = state_dict.get(EMBED_IN)
        if embed is not None and embed.device.type != self.device.type:
            raise ValueError(f"the weights are on {embed.device}, but device={self.device} was asked for")
        max_model_len = config.max_position_embeddings
        if max_num_batched_tokens is None:
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS if chunked_prefill \
                else max(DEFAULT_MAX_NUM_BATCHED_TOKENS_UNCHUNKED, max_model_len)
        self.model = PagedModel(config, state_dict, load_ops(ops))
        self.runner = ModelRunner(self.model, block_size=block_size, num_kv_blocks=kv_cache_blocks,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  gpu_memory_utilization=gpu_memory_utilization, use_cuda_graphs=cuda_graphs)
        if self.runner.use_cuda_graphs or warmup:
            self.runner.warm_up(prefill=warmup)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size)
        self.output_processor = OutputProcessor(block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                   chunked_prefill=chunked_prefill)
        self.grammars = GrammarCompiler(tokenizer, config.vocab_size)  # structured outputs' grammars, compiled once
        self._seq_ids = itertools.count()
        self._cond = threading.Condition()  # guards the scheduler and every Sequence; notified after each step
        self._driving = False  # a thread is inside _step()
        self._requests: dict[int, list[Sequence]] = {}  # unfinished requests by id: their completions, by index
        self._aborts: list[int] = []  # ids whose abort waits for the driver
        self._updates: list[RequestUpdate] = []  # for step()'s caller: requests submitted with add_request
        self._in_flight: InFlight | None = None  # the launched step whose tokens are not read yet (driver only)

    # ---- submission ------------------------------------------------------------------------------------------

    def _new_sequence(self, prompt_ids: Seq[int], params: SamplingParams, delivery: Delivery, *,
                      checked: bool = False) -> Sequence:
        """Check one request where it enters the engine, the one place it is checked (engine.core.request_checks);
        raise ValueError naming the bad value. checked: the caller ran check_request already (Engine does, to raise
        before any work starts), so only this engine's capacity is checked here. Returns its first completion's
        sequence, the others in its fork_children."""
        prompt_ids = list(prompt_ids)
        if not checked:
            check_request(prompt_ids, params, vocab_size=self.config.vocab_size,
                          max_model_len=self.config.max_position_embeddings)
        check_capacity(len(prompt_ids), params, max_num_seqs=self.scheduler.max_num_seqs,
                       num_blocks=self.block_manager.num_blocks, block_size=self.block_manager.block_size)
        num_sequences = max(params.num_candidates, params.num_beams)
        grammar = self.grammars.matcher(params.structured_outputs, eos_token_ids(params, self.config.eos_token_id)) \
            if params.structured_outputs is not None else None
        output = OutputBuilder(self.tokenizer, prompt_ids, params, self.config.eos_token_id, grammar)
        seq = Sequence(next(self._seq_ids), prompt_ids, params, output, delivery)
        seq.fork_children = [seq.fork(next(self._seq_ids), completion_seed(seq.seed, index), index)
                             for index in range(1, num_sequences)]
        if params.num_beams > 1:
            BeamGroup([seq, *seq.fork_children], self.config.eos_token_id, self.device)
        if params.ranks_candidates:
            CandidateGroup([seq, *seq.fork_children])
        return seq

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> int:
        """Queue one request; returns its id. Its results come back through step(), one final update per
        completion (params.num_return_sequences of them, told apart by RequestUpdate.index). Raises ValueError
        (for this request only) if it can never run."""
        seq = self._new_sequence(prompt_ids, params, Delivery.UPDATES)
        self._enqueue([seq])
        return seq.seq_id

    def _enqueue(self, seqs: list[Sequence]) -> None:
        with self._cond:  # all at once: they can share the first prefill batch
            for seq in seqs:
                self.scheduler.add(seq)
                self._requests[seq.request_id] = [seq, *seq.fork_children]

    def abort(self, request_id: int) -> None:
        """Finish a request (each of its unfinished completions) with finish_reason "abort" and free its blocks
        (from any thread). A request that has finished already, or an id never issued, is left alone."""
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            raise ValueError(f"request_id must be an int, got {request_id!r}")
        with self._cond:
            self._aborts.append(request_id)
            if not self._driving:  # else the driver applies it before its next step
                self._apply_aborts()

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            self._finish_request(self._requests.get(request_id, []), "abort", "aborted")
        self._aborts.clear()

    def _finish_request(self, seqs: list[Sequence], reason: str, message: str) -> None:
        ended = [seq for seq in seqs if not seq.is_finished]
        for seq in ended:
            self.scheduler.abort(seq)  # a token of it still in flight is dropped when read back
        self._hand_out(self.output_processor.end(ended, reason, message))

    # ---- stepping --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestUpdate]:
        """Run one engine step (after any step another thread is running). Returns the updates, in order, of the
        requests submitted with add_request that became known since the last call, whichever thread's step
        produced them: new tokens and text, and the final output on a request's last update."""
        self._claim_driver(_never)
        try:
            self._step()
        finally:
            with self._cond:
                updates, self._updates = self._updates, []
                self._release_driver()
        return updates

    def _step(self) -> None:
        """Plan and launch step N, then read back and process step N-1 (the driver only)."""
        try:
            self._launch_and_read_back()
        except Exception as err:
            self._fail_all(f"the engine step failed: {type(err).__name__}: {err}")
            raise

    def _launch_and_read_back(self) -> None:
        previous = self._in_flight
        with self._cond:
            if self._aborts:
                self._apply_aborts()
            plan = self.scheduler.schedule(results_in_flight=previous is not None)
            if plan is None:  # blocks are short: know every token first, as an engine without the lag would
                self._process(previous, self.runner.collect(previous))
                self._in_flight = previous = None
                plan = self.scheduler.schedule()
            if not plan.has_work and previous is None and self.scheduler.has_work():
                raise RuntimeError(f"nothing schedulable: {len(self.scheduler.waiting)} waiting, "  # a scheduler bug
                                   f"{len(self.scheduler.running)} running, "
                                   f"{self.block_manager.num_free_blocks} free blocks")
        self._in_flight = self.runner.launch(plan) if plan.has_work else None
        results = self.runner.collect(previous) if previous is not None else None  # the device runs step N meanwhile
        with self._cond:
            if plan.chunks:
                self.scheduler.publish_prefilled(plan)
            if previous is not None:
                self._process(previous, results)
        # The next drafts, beams or grammar masks start from these tokens: read them back at once.
        if plan.drafts or plan.beams or plan.grammar_masks is not None:
            launched, self._in_flight = self._in_flight, None
            results = self.runner.collect(launched)
            with self._cond:
                self._process(launched, results)

    def _process(self, step: InFlight, result: StepResult) -> None:
        """Hand one read-back step's results to their requests (under the lock): the output processor applies them to
        the sequences, the scheduler brings its blocks and slots up to date, and the updates go out."""
        outputs = self.output_processor.process(step.plan, result)
        self.scheduler.update_from_outputs(step.plan, outputs)
        self._hand_out(outputs.updates)

    def _hand_out(self, updates: list[Update]) -> None:
        """Give each request what a step made known: to step()'s caller, a stream, or nobody yet (generate() reads
        the final output)."""
        for seq, tokens, delta in updates:
            finished = seq.status is SequenceStatus.FINISHED
            if finished and all(other.is_finished for other in self._requests.get(seq.request_id, ())):
                self._requests.pop(seq.request_id, None)  # (a beam group hands out its outputs after all its beams end)
            if seq.delivery is Delivery.UPDATES:
                output = seq.output
                new_logprobs = prompt_logprobs = None
                if output.logprobs is not None or output.prompt_logprobs is not None:
                    if tokens and output.logprobs is not None:
                        new_logprobs = output.logprobs[-len(tokens):]
                    if len(output.token_ids) == len(tokens):  # its first update: its first tokens, or its end
                        prompt_logprobs = output.prompt_logprobs
                self._updates.append(RequestUpdate(seq.request_id, list(tokens), delta,
                                                   output.result() if finished else None, seq.index, new_logprobs,
                                                   prompt_logprobs))
            if delta and seq.delivery is Delivery.STREAM:
                seq.text_deltas.append(delta)

    def _fail_all(self, message: str) -> None:
        """A step raised (e.g. out of memory): fail every request, so that no caller waits forever."""
        with self._cond:
            self._in_flight = None
            for seqs in list(self._requests.values()):
                self._finish_request(seqs, "error", message)

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
            if self._aborts:
                self._apply_aborts()
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

    def generate(self, prompts: Seq[Seq[int]], params: Seq[SamplingParams], *,
                 checked: bool = False) -> list[GenerationOutput]:
        """The outputs of each prompt in order: num_return_sequences of them per prompt, consecutively. A request
        that can never run, or that fails on its own, gets outputs with finish_reason "error" and the reason in
        .error while the others run; an aborted one "abort". If an engine step fails, the thread that ran it
        re-raises the error and every request fails with it. checked: every request passed check_request already
        (see _new_sequence)."""
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        requests: list[Sequence | GenerationOutput] = []
        for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                requests.append(self._new_sequence(prompt, p, Delivery.RESULT, checked=checked))
            except ValueError as err:
                requests.append(_failed_output(list(prompt), f"request {index}: {err}"))
        completions = [[seq, *seq.fork_children] if isinstance(seq, Sequence) else seq for seq in requests]
        self._enqueue([seq for seq in requests if isinstance(seq, Sequence)])
        self._drive_until(lambda: all(seq.is_finished for seqs in completions if isinstance(seqs, list)
                                      for seq in seqs))
        outputs: list[GenerationOutput] = []
        for seqs, p in zip(completions, params, strict=True):
            if isinstance(seqs, list):  # beams and best_of: the best n (best_of renumbers its candidates)
                outputs += [seq.output.result() for seq in sorted(seqs, key=_index)[: p.num_return_sequences]]
            else:  # refused: one copy of the error per completion asked for
                outputs += [seqs] * (p.num_return_sequences if isinstance(p, SamplingParams) else 1)
        return outputs

    def score(self, pairs: Seq[tuple[Seq[int], Seq[int]]], *, checked: bool = False) -> list[ScoreOutput]:
        """The log-likelihood of each continuation after its context, (context ids, continuation ids) per pair, in
        order. Each pair is one prefill-only request whose prompt is context + continuation: the LM head runs at
        the continuation's positions only, and the context's full blocks may come from the prefix cache (contexts
        shared between pairs are computed once). Raises ValueError for a pair that can never run, RuntimeError for
        one that failed (non-finite logits). checked: every pair passed check_score_pair, and its context +
        continuation check_request with SCORING, already."""
        seqs = []
        for index, (context, continuation) in enumerate(pairs):
            try:
                if not checked:
                    check_score_pair(context, continuation)
                seq = self._new_sequence([*context, *continuation], SCORING, Delivery.RESULT, checked=checked)
            except ValueError as err:
                raise ValueError(f"pair {index}: {err}") from None
            seq.score_from = len(context)
            seqs.append(seq)
        self._enqueue(seqs)
        self._drive_until(lambda: all(seq.is_finished for seq in seqs))
        scores = []
        for index, seq in enumerate(seqs):
            output = seq.output.result()
            if output.finish_reason != "length":
                raise RuntimeError(f"pair {index} could not be scored: {output.error}")
            entries = output.prompt_logprobs[seq.score_from:]
            logprobs = [entry.logprob for entry in entries]
            scores.append(ScoreOutput(total_logprob=sum(logprobs), token_logprobs=logprobs,
                                      is_greedy=all(entry.top[0][0] == entry.token_id for entry in entries),
                                      token_ids=[entry.token_id for entry in entries]))
        return scores

    def stream(self, prompt_ids: Seq[int], params: SamplingParams, *, checked: bool = False) -> Iterator[str]:
        """Yield text deltas as tokens are sampled; they join to generate()'s text. Closing the iterator early
        aborts the request and frees its blocks. Raises ValueError at once for a request that can never run or asks
        for several completions, and RuntimeError at the end if the request failed. checked: the request passed
        check_request already."""
        if isinstance(params, SamplingParams) and params.num_return_sequences > 1:
            raise ValueError(f"stream() yields the text of one completion, but num_return_sequences is "
                             f"{params.num_return_sequences}; use generate(), or add_request() and step(), whose "
                             f"updates carry each completion's index")
        if isinstance(params, SamplingParams) and params.ranks_candidates:
            raise ValueError(f"best_of {params.best_of} does not stream: the best candidate is known only once all "
                             f"of them ended (OpenAI refuses it too); use generate()")
        seq = self._new_sequence(prompt_ids, params, Delivery.STREAM, checked=checked)
        self._enqueue([seq])
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
            if seq.output.finish_reason == "error":
                raise RuntimeError(f"request {seq.seq_id} failed: {seq.error}")
        finally:
            if not seq.is_finished:
                self.abort(seq.seq_id)

    def close(self) -> None:
        """Release the KV pool and graphs; the engine cannot be used afterwards."""
        with self._cond:
            self.runner.close()


def _never() -> bool:
    return False


def _index(seq: Sequence) -> int:
    return seq.index


def _failed_output(prompt_ids: list[int], message: str) -> GenerationOutput:
    return GenerationOutput(text="", token_ids=[], finish_reason="error", prompt_token_ids=prompt_ids,
                            timings=Timings(prompt_tokens=len(prompt_ids), generated_tokens=0,
                                            time_to_first_token_s=0.0, total_s=0.0), error=message)
