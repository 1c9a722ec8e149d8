"""What a read-back step means for its requests: the second half of the loop (scheduler -> StepPlan -> worker ->
StepResult -> here -> request updates).

For each row of the step's plan that sampled: its tokens are appended to its sequence, their logprobs recorded, its
text detokenized and its stop rules applied (OutputBuilder: eos, stop strings, max_new_tokens); rows whose logits
were not finite fail alone. A mixed step's prompt logprobs are stored, requests that end with their prompt
(max_new_tokens 0) finish, and each beam group's search takes its step (engine.decoding.paged_beams: the beams'
new tokens, or the group's end with its best hypotheses). A sequence that stopped after its step was planned rides
along once more; its row is skipped here (the scheduler's one-step lag, engine.core.scheduler).

`process` returns a StepOutputs and touches no block and no slot: the updates to hand out, in order, and what the
scheduler brings its blocks and slots up to date with (`Scheduler.update_from_outputs`): sequences that ended,
sequences whose newest tokens completed KV blocks, beams' new parents, draft checks' kept lengths. best_of
candidates hand out nothing until all of them ended; then the best n, each whole (engine.decoding.best_of).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hayabusa.engine.core.sequence import Sequence, SequenceStatus
from hayabusa.engine.core.step_plan import StepPlan
from hayabusa.engine.decoding.beam_search import BeamStep
from hayabusa.engine.decoding.paged_beams import BeamGroup

if TYPE_CHECKING:
    from hayabusa.engine.sample.logprobs import StepLogprobs
    from hayabusa.engine.worker.model_runner import StepResult

NON_FINITE_ERROR = "the model produced non-finite logits (NaN or inf) for this request"
Update = tuple[Sequence, Seq[int], str]  # (sequence, its new tokens, its text delta)


@dataclass
class StepOutputs:
    """What one read-back step made of its requests."""

    updates: list[Update] = field(default_factory=list)  # in order: what each request learns
    # What the scheduler updates its blocks and slots with, in the order the step's rows were processed:
    prompts_ended: list[Sequence] = field(default_factory=list)  # finished or failed with their prompt: free them
    beam_steps: list[tuple[BeamGroup, BeamStep | None]] = field(default_factory=list)  # None: failed; done: ended
    # Rows, in order, whose blocks change: (sequence, how many of its leading tokens now have their KV in the cache
    # to publish, 0 for none). An ended sequence is freed after; with draft checks every row that ran one is here,
    # and an unfinished one keeps the blocks its kept tokens need.
    grown: list[tuple[Sequence, int]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size  # a row whose newest token completes a block publishes it

    def process(self, plan: StepPlan, result: StepResult) -> StepOutputs:
        """Apply one read-back step's tokens (and logprobs, and beam logits) to the sequences of its plan."""
        outputs = StepOutputs()
        if plan.scored or plan.forked_from or plan.prompt_ends:
            self._prompt_results(plan, result, outputs)
        if plan.beams:
            self._beam_steps(plan, result, outputs)
        if plan.drafts:
            self._drafts_checked(plan, result, outputs)
        else:
            self._tokens_sampled(plan, result, outputs)
        return outputs

    def end(self, seqs: Seq[Sequence], reason: str, message: str) -> list[Update]:
        """Finish the unfinished ones of a request's sequences early (reason "abort" or "error", message in their
        output's .error); the updates that tell their callers. Beams past the request's n are told nothing."""
        ended = [seq for seq in seqs if not seq.is_finished]
        for seq in ended:
            seq.fail(reason, message)
        updates: list[Update] = []
        for seq in ended:  # all ended first: the last update closes the request
            if seq.beam_group is None or seq.index < seq.params.num_return_sequences:
                self._update(updates, seq, (), "")
        return updates

    def _update(self, updates: list[Update], seq: Sequence, tokens: Seq[int], delta: str) -> None:
        """Tell seq's caller what this step made known; best_of candidates wait until all of them ended, then
        the best n are told whole."""
        if seq.candidates is None:
            updates.append((seq, tokens, delta))
            return
        for best in seq.candidates.take_best():
            updates.append((best, best.token_ids[best.num_prompt_tokens:], best.output.result().text))

    def _tokens_sampled(self, plan: StepPlan, result: StepResult, outputs: StepOutputs) -> None:
        """Rows that sampled one token each (once per sequence per step: kept lean)."""
        token_ids, bad_rows, updates, grown = result.token_ids, result.bad_rows, outputs.updates, outputs.grown
        sampled = result.logprobs.sampled if result.logprobs is not None else None
        block_size = self.block_size
        if plan.num_sampling_rows == plan.num_rows:
            rows = zip(plan.seqs, token_ids, range(plan.num_rows), strict=True)
        else:
            rows = ((plan.seqs[row], token_ids[row], row) for row in plan.tokens_per_row.nonzero()[0].tolist())
        running, finished = SequenceStatus.RUNNING, SequenceStatus.FINISHED
        for seq, token, row in rows:
            if seq.status is not running or plan.beams and seq.beam_group is not None:
                continue  # finished (eos, stop string, abort) after this step was planned, or a beam (done above)
            if bad_rows and row in bad_rows:
                self._fail_non_finite(seq, outputs)
                continue
            seq.token_ids.append(token)
            if sampled is not None and seq.output.cumulative_logprob is not None:  # logprobs or best_of asked
                seq.output.record_logprobs(sampled, row, token)
            delta = seq.output.append(token)
            # Every token but the one just sampled now has its KV in the cache; a prefill's were published at launch.
            computed = len(seq.token_ids) - 1
            if seq.output.finish_reason is not None:
                seq.status = finished
                grown.append((seq, computed if computed % block_size == 0 else 0))
            elif computed % block_size == 0:
                grown.append((seq, computed))
            if seq.candidates is None:
                updates.append((seq, (token,), delta))
            else:
                self._update(updates, seq, (token,), delta)

    def _drafts_checked(self, plan: StepPlan, result: StepResult, outputs: StepOutputs) -> None:
        """Rows of a step with draft checks (read back at once, so nothing else is in flight) emit several tokens,
        up to and including the first that differs from their drafts. Rows that want logprobs never draft: they emit
        one token, whose logprobs are at their row."""
        row_tokens, bad_rows = result.token_ids, result.bad_rows
        sampled = result.logprobs.sampled if result.logprobs is not None else None
        for row in plan.tokens_per_row.nonzero()[0].tolist():
            seq = plan.seqs[row]
            if seq.status is not SequenceStatus.RUNNING or seq.beam_group is not None:
                continue
            if row in bad_rows:
                self._fail_non_finite(seq, outputs)
                continue
            emitted, delta = [], ""
            if sampled is not None and seq.output.cumulative_logprob is not None:
                seq.output.record_logprobs(sampled, row, row_tokens[row][0])
            for token in row_tokens[row]:
                seq.token_ids.append(token)
                emitted.append(token)
                delta += seq.output.append(token)
                if seq.output.finish_reason is not None:
                    break
            if row in plan.drafts:
                seq.output.count_draft_check(len(plan.drafts[row]), len(row_tokens[row]) - 1)
            if seq.output.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
            outputs.grown.append((seq, len(seq.token_ids) - 1))
            self._update(outputs.updates, seq, emitted, delta)

    def _fail_non_finite(self, seq: Sequence, outputs: StepOutputs) -> None:
        seq.fail("error", f"{NON_FINITE_ERROR} at completion token {seq.num_completion_tokens}")
        outputs.grown.append((seq, 0))
        self._update(outputs.updates, seq, (), "")

    def _prompt_results(self, plan: StepPlan, result: StepResult, outputs: StepOutputs) -> None:
        """A mixed step's prompt logprobs (children started by a parent's last chunk get the parent's), and the end
        of the requests whose prompt ended here and that sample nothing (max_new_tokens 0)."""
        logprobs: StepLogprobs | None = result.logprobs
        start = 0
        for row, (first, end) in plan.scored.items():
            seq = plan.seqs[row]
            targets = seq.token_ids[first + 1:end + 1]  # position p's logits score token p + 1
            entries = logprobs.prompt.entries(start, targets, seq.params.prompt_logprobs) if targets else []
            start += len(targets)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if entries is None:
                seq.fail("error", f"{NON_FINITE_ERROR} in its prompt")
                outputs.prompts_ended.append(seq)
                self._update(outputs.updates, seq, (), "")
                continue
            if seq.output.prompt_logprobs is None:
                seq.output.prompt_logprobs = [None] * seq.num_prompt_tokens
            seq.output.prompt_logprobs[first + 1:end + 1] = entries
            if end == seq.num_prompt_tokens - 1:
                seq.prompt_scored = True
        for child_row, parent_row in plan.forked_from.items():
            child, parent = plan.seqs[child_row], plan.seqs[parent_row]
            child.output.prompt_logprobs, child.prompt_scored = parent.output.prompt_logprobs, parent.prompt_scored
        for row in plan.prompt_ends:
            seq = plan.seqs[row]
            if seq.status is SequenceStatus.RUNNING:
                seq.output.end_of_prompt()
                seq.status = SequenceStatus.FINISHED
                outputs.prompts_ended.append(seq)
                self._update(outputs.updates, seq, (), "")

    def _beam_steps(self, plan: StepPlan, result: StepResult, outputs: StepOutputs) -> None:
        """Each beam group's search step from its rows' logits (steps with beams are read back at once, so every
        token is known here): the beams' new tokens, or the group's end, with its best hypotheses when its search is
        done, or with an error when its logits were not finite."""
        for (group, rows), logits in zip(plan.beams, result.beam_logits, strict=True):
            if any(seq.status is not SequenceStatus.RUNNING for seq in group.seqs):
                continue  # aborted meanwhile
            step = None if result.bad_rows.intersection(rows) else group.score(logits)
            outputs.beam_steps.append((group, step))
            if step is not None and not step.done:
                group.advance(step)
                continue
            for seq in group.seqs:
                seq.status = SequenceStatus.FINISHED
            if step is None:
                for seq in group.seqs:
                    seq.fail("error", f"{NON_FINITE_ERROR} at beam step {group.search.steps}")
                results = group.seqs[: group.params.num_return_sequences]
            else:
                results = group.finish()
            for seq in results:
                self._update(outputs.updates, seq, seq.token_ids[seq.num_prompt_tokens:], seq.output.result().text)
