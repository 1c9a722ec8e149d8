"""One request inside the paged engine: its tokens, status, block table, sampling params and output."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from hayabusa.engine.sampling import SamplingParams, request_seed

if TYPE_CHECKING:
    from hayabusa.engine.outputs import OutputBuilder


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill: new, or preempted and waiting to recompute
    RUNNING = "running"  # holds blocks, decodes one token per step
    FINISHED = "finished"  # stopped (eos, stop string, length), failed or aborted; holds no blocks


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, output: OutputBuilder) -> None:
        self.seq_id = seq_id
        self.token_ids = list(prompt_ids)  # prompt then completion; the last one is not in the KV cache yet
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = request_seed(params)
        self.output = output
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # leading tokens whose KV came from the prefix cache at the last allocation
        self.num_preemptions = 0
        self.error: str | None = None  # set when the request failed alone (e.g. can never fit the KV pool)
        self.text_deltas: list[str] = []  # produced but not yet taken by a stream() reader

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record a sampled token; the output builder decides whether the request is done (eos, stop, length)."""
        self.token_ids.append(token_id)
        delta = self.output.append(token_id)
        if delta:
            self.text_deltas.append(delta)
        if self.output.finished:
            self.finish()

    def fail(self, message: str) -> None:
        self.error = message
        self.finish()

    def finish(self) -> None:
        self.status = SequenceStatus.FINISHED
