"""best_of (OpenAI's legacy completions): sample best_of candidates of one prompt and return the num_return_sequences
whose generated tokens have the highest summed logprob, best first.

The candidates run as the request's completions do (sequences forked from the first, sharing the prompt's KV
blocks; candidate j samples with completion_seed(seed, j), so it equals a one-completion request with that seed).
Each computes its sampled tokens' logprobs on the device, as `logprobs` does (log-softmax of the raw logits), and
its OutputBuilder sums them (`cumulative_logprob`). Nothing of the request is handed out while a candidate runs;
once the last one ends, the best n become completions 0..n-1 and each is handed out whole (its tokens, text and
logprobs in one final update). A candidate that failed (non-finite logits, aborted) ranks first: the request's
outputs then carry the failure instead of a best-of-the-rest that hides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hayabusa.engine.core.sequence import Sequence


class CandidateGroup:
    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs  # candidate j: seqs[j]
        self.num_returned = seqs[0].params.num_return_sequences
        self._ranked = False
        for seq in seqs:
            seq.candidates = self

    def take_best(self) -> list[Sequence]:
        """Once every candidate ended, and only the first time it is asked then: the num_returned best, renumbered
        0..n-1 (seq.index) best first; the others get the indices after them. Else []."""
        if self._ranked or not all(seq.is_finished for seq in self.seqs):
            return []
        self._ranked = True
        ranked = sorted(self.seqs, key=_rank)  # stable: equal sums keep candidate order
        for index, seq in enumerate(ranked):
            seq.index = index
        return ranked[: self.num_returned]


def _rank(seq: Sequence) -> tuple[bool, float]:
    """Sort key: failed candidates first, then the highest summed logprob of the generated tokens."""
    output = seq.output
    if output.finish_reason not in ("stop", "length"):
        return False, 0.0
    return True, -output.cumulative_logprob
