"""Log-probabilities of tokens under the model's raw distribution: computed on the device, read back with a step's
sampled ids, turned into `TokenLogprobs` on the host.

A logprob is log_softmax of the RAW logits in float32: before the repetition penalty, temperature, top-k and
top-p, so it is the model's own probability whatever sampling settings picked the token (the same convention as
vLLM's default and OpenAI's completions API). Each scored position also gets its TOP_LOGPROBS most likely tokens;
the host keeps as many as the request asked for.

- Sampled tokens (`SamplingParams.logprobs`): the step's logits and its sampled ids, after the sampler ran.
- Prompt tokens (`SamplingParams.prompt_logprobs`, `Engine.score`): the prefill's hidden states at the scored
  positions go through the LM head PROMPT_CHUNK_ROWS at a time, so a long prompt never holds [tokens, vocab]
  float32 logits at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hayabusa.engine.outputs import TokenLogprobs
from hayabusa.engine.sampling_params import MAX_LOGPROBS

TOP_LOGPROBS = MAX_LOGPROBS  # alternatives computed per position; one width keeps the read-back layout fixed


@dataclass
class DeviceLogprobs:
    """Logprobs of R positions on the device."""

    chosen: Tensor  # float32 [R]: the logprob of each position's token (sampled, or the next prompt token)
    top_logprobs: Tensor  # float32 [R, k]: the k most likely tokens' logprobs, descending
    top_ids: Tensor  # int64 [R, k]

    def scatter(self, rows: Tensor, num_rows: int) -> DeviceLogprobs:
        """These R positions placed at rows (int64 [R], distinct) of num_rows; the other rows hold NaN / -1."""
        def placed(tensor: Tensor, fill: float) -> Tensor:
            return tensor.new_full((num_rows, *tensor.shape[1:]), fill).index_copy_(0, rows, tensor)

        return DeviceLogprobs(placed(self.chosen, float("nan")), placed(self.top_logprobs, float("nan")),
                              placed(self.top_ids, -1))

    def copy_to_host(self, pinned: bool) -> HostLogprobs:
        """Start copying to host memory (async when pinned: valid once the step's read-back event completed)."""
        def host(tensor: Tensor) -> np.ndarray:
            out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            out.copy_(tensor, non_blocking=pinned)
            return out.numpy()  # keeps `out` alive

        return HostLogprobs(host(self.chosen), host(self.top_logprobs), host(self.top_ids))


@dataclass
class HostLogprobs:
    """DeviceLogprobs in host memory (numpy views), turned into TokenLogprobs per position."""

    chosen: np.ndarray
    top_logprobs: np.ndarray
    top_ids: np.ndarray

    def entry(self, row: int, token_id: int, num_top: int) -> TokenLogprobs:
        ids, logprobs = self.top_ids[row, :num_top].tolist(), self.top_logprobs[row, :num_top].tolist()
        return TokenLogprobs(token_id, float(self.chosen[row]), tuple(zip(ids, logprobs, strict=True)))

    def entries(self, start: int, token_ids: Sequence[int], num_top: int) -> list[TokenLogprobs] | None:
        """Rows start.. for token_ids, one each; None when any logprob is not finite (non-finite logits)."""
        end = start + len(token_ids)
        if not np.isfinite(self.chosen[start:end]).all():
            return None
        return [self.entry(row, token_id, num_top) for row, token_id in zip(range(start, end), token_ids, strict=True)]


@dataclass
class StepLogprobs:
    """What a step's read-back holds besides the ids: logprobs of its sampled tokens and of its scored prompts."""

    sampled: HostLogprobs | None  # per plan row (the host reads the rows that sampled and asked)
    prompt: HostLogprobs | None  # the scored positions of plan.scored, concatenated in that order


def token_logprobs(logits: Tensor, token_ids: Tensor) -> DeviceLogprobs:
    """logits [R, vocab] (raw, any float dtype), token_ids int64 [R] -> their logprobs and the top alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, vocab] float32
    top = logprobs.topk(min(TOP_LOGPROBS, logprobs.shape[-1]), dim=-1)  # sorted, most likely first
    return DeviceLogprobs(logprobs.gather(1, token_ids[:, None])[:, 0], top.values, top.indices)


PROMPT_CHUNK_ROWS = 256  # positions per LM-head call when scoring a prompt: 256 x 32k float32 logits = 32 MiB


def prompt_logprobs(lm_head: Callable[[Tensor], Tensor], hidden: Tensor, rows: Tensor, targets: Tensor,
                    padded_rows: Callable[[int], int], chunk_rows: int = PROMPT_CHUNK_ROWS) -> DeviceLogprobs:
    """Logprobs of targets[i] given the prefill's position rows[i]: hidden [T, hidden_size] (the last layer's
    residual stream), rows and targets int64 [R]. lm_head maps hidden rows to logits; padded_rows(n) is the row
    count a chunk of n runs at (the LM head's padded shapes), the extra rows repeating the last one."""
    chunks = []
    for start in range(0, rows.shape[0], chunk_rows):
        index = rows[start:start + chunk_rows]
        count = index.shape[0]
        padding = padded_rows(count) - count
        if padding:
            index = torch.cat([index, index[-1:].expand(padding)])
        logits = lm_head(hidden[index])[:count]  # [count, vocab]
        chunks.append(token_logprobs(logits, targets[start:start + count]))
    return DeviceLogprobs(*(torch.cat([getattr(c, name) for c in chunks])
                            for name in ("chosen", "top_logprobs", "top_ids")))
