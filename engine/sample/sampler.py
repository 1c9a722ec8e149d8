"""Per-slot sampling state on the device, and the sampling step that feeds the next decode without the host.

Row `slot` of each tensor belongs to the running sequence in that slot (engine.core.slots): its settings, its noise
step counter, for the repetition penalty its seen-token mask, and for the processors (logits_processors) its eos and
banned-token masks, bad-word patterns, logit_bias entries and token history (the frequency and presence penalties
count the generated part of it on the device each step: no count goes through the host). `sample` reads a batch's
logits and writes the chosen ids straight into `last_token[rows]` (the next decode step's input ids) and each row's
largest raw logit into `row_max[rows]`; the host reads both back one step later. A non-finite row max flags a row
whose logits hold NaN or +inf, or no finite value at all: that request fails with an error instead of a silent token.

A step samples in one of three modes, the cheapest that serves all its rows (`row_mode`):
- GREEDY: every row greedy with no penalty or processor: one `max` reduction writes the ids and row maxima together.
- SAMPLE: `sampling.sample_rows` with the penalty, temperature, top-k, top-p and seeded draws (about 90 small
  kernels, half of them the counter-based noise hash: a fused sampling kernel is the obvious next step).
- PROCESS: SAMPLE plus the processors (logit_bias, frequency_penalty, presence_penalty, no_repeat_ngram_size,
  bad_words_ids, min_new_tokens, min_p, typical_p) and the token history they read, appended to on the device as
  tokens are sampled.
Structured outputs add no mode: a step whose rows have grammars passes their allowed tokens (`allowed`, unpacked from
the step's uploaded bitmasks) and each mode masks the rows' logits with them once, after the processors and before
the warpers; without them the step launches what it did before.
Rows whose option is off come out of a richer mode exactly as the cheaper one would give them. Per-row state that
only a richer mode reads (masks, patterns, history) is loaded only for the rows that use it, and read only where the
row's settings say it was loaded, so stale rows left by earlier occupants never matter.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hayabusa.engine.sample.logits_processors import (
    HISTORY_MARGIN,
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    SENTINEL,
    WILDCARD,
    bad_word_patterns,
    banned_tokens,
    generated_counts,
    logit_bias_rows,
    split_bad_words,
)
from hayabusa.engine.sample.ops import RowProcessors, effective_temperature, sample_rows
from hayabusa.engine.sampling_params import SamplingParams, eos_token_ids
from hayabusa.engine.worker.staging import Field, PackedUpload


class SlotSequence(Protocol):
    """What the sampler reads of a sequence it loads (engine.core.sequence.Sequence satisfies it)."""

    params: SamplingParams
    seed: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_completion_tokens: int

# Columns of the settings tensors.
# float_settings; temperature 0 marks a greedy row
TEMPERATURE, TOP_P, PENALTY, MIN_P, TYPICAL_P, FREQUENCY_PENALTY, PRESENCE_PENALTY = range(7)
NUM_FLOAT_SETTINGS = 7
# int_settings: STEP counts the row's sampled tokens (it keys the noise; PROMPT_LEN + STEP tokens are in the history);
# NUM_PATTERNS, HAS_BANS and NUM_BIASES say whether the row's patterns, static bans and logit_bias were loaded.
TOP_K, SEED, STEP, MIN_NEW_TOKENS, NGRAM, NUM_PATTERNS, HAS_BANS, PROMPT_LEN, NUM_BIASES = range(9)
NUM_INT_SETTINGS = 9

# Exponent bits of each dtype: all ones means inf or NaN.
_EXPONENT_MASKS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                   torch.bfloat16: (torch.int16, 0x7F80)}


class SamplerMode(enum.IntEnum):
    GREEDY = 0
    SAMPLE = 1
    PROCESS = 2


def row_mode(params: SamplingParams) -> SamplerMode:
    """The cheapest mode that serves a request."""
    if params.needs_processors:
        return SamplerMode.PROCESS
    if not params.greedy or params.repetition_penalty != 1.0:
        return SamplerMode.SAMPLE
    return SamplerMode.GREEDY


class SlotSampler:
    def __init__(self, max_num_seqs: int, vocab_size: int, logits_dtype: torch.dtype, device: torch.device, *,
                 max_model_len: int, eos_token_id: int | None) -> None:
        if logits_dtype not in _EXPONENT_MASKS:
            raise ValueError(f"logits dtype must be one of {tuple(_EXPONENT_MASKS)}, got {logits_dtype}")
        self.logits_dtype = logits_dtype
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_id = eos_token_id  # the model's, for requests that name none
        self.last_token = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)  # next decode's input ids
        self.row_max = torch.zeros(max_num_seqs, dtype=logits_dtype, device=device)
        self.float_settings = torch.ones(max_num_seqs, NUM_FLOAT_SETTINGS, dtype=torch.float32, device=device)
        self.int_settings = torch.zeros(max_num_seqs, NUM_INT_SETTINGS, dtype=torch.int64, device=device)
        # Each max_num_seqs x vocab bytes (8 MB for 256 x 32k); only rows of sequences that use them are initialised.
        self.seen = torch.zeros(max_num_seqs, vocab_size, dtype=torch.bool, device=device)  # repetition penalty
        self.eos_mask = torch.zeros(max_num_seqs, vocab_size, dtype=torch.bool, device=device)  # min_new_tokens
        self.static_bans = torch.zeros(max_num_seqs, vocab_size, dtype=torch.bool, device=device)  # 1-token bad words
        self.patterns = torch.full((max_num_seqs, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS), WILDCARD, dtype=torch.int64,
                                   device=device)  # multi-token bad words (logits_processors.bad_word_patterns)
        # logit_bias: each row's first NUM_BIASES entries (logits_processors.logit_bias_rows)
        self.bias_ids = torch.zeros(max_num_seqs, MAX_LOGIT_BIAS, dtype=torch.int64, device=device)
        self.bias_values = torch.zeros(max_num_seqs, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        # The layout of logits_processors; one spare column past max_model_len absorbs the writes of rows that ride
        # along after their last token.
        self.history = torch.full((max_num_seqs, HISTORY_MARGIN + max_model_len + 1), SENTINEL, dtype=torch.int64,
                                  device=device)
        self._processor_uploads = PackedUpload(1 << 16, device)
        self._row_ids = torch.arange(max_num_seqs, device=device)  # static: a slice of it indexes a slice's rows
        self._true = torch.ones((), dtype=torch.bool, device=device)  # a device value: writes copy nothing (graphs)

    def per_slot_tensors(self) -> list[Tensor]:
        """The tensors whose rows move with a sequence when it changes slot."""
        return [self.last_token, self.float_settings, self.int_settings, self.seen, self.eos_mask, self.static_bans,
                self.patterns, self.bias_ids, self.bias_values, self.history]

    # ---- loading newly admitted rows -------------------------------------------------------------------------

    @staticmethod
    def settings_fields(num_rows: int, num_seen: int) -> list[Field]:
        """Upload fields holding the sampler state of num_rows newly admitted sequences that have seen num_seen
        tokens under a repetition penalty (num_seen_tokens); fill_settings writes them."""
        return [("float_settings", torch.float32, (num_rows, NUM_FLOAT_SETTINGS)),
                ("int_settings", torch.int64, (num_rows, NUM_INT_SETTINGS)),
                ("settings_slots", torch.int64, (num_rows,)), ("seen_index", torch.int64, (num_seen,))]

    @staticmethod
    def num_seen_tokens(seqs: Sequence[SlotSequence]) -> int:
        return sum(len(seq.token_ids) for seq in seqs if seq.params.repetition_penalty != 1.0)

    def fill_settings(self, host: dict[str, np.ndarray], slots: Sequence[int], seqs: Sequence[SlotSequence]) -> None:
        """Write the settings of seqs, admitted into `slots`, into host views of settings_fields."""
        vocab, cursor, seen_index = self.vocab_size, 0, host["seen_index"]
        for i, (slot, seq) in enumerate(zip(slots, seqs, strict=True)):
            p = seq.params
            single, multi = split_bad_words(p.bad_words_ids, eos_token_ids(p, self.eos_token_id))
            host["float_settings"][i] = (effective_temperature(p), p.top_p, p.repetition_penalty, p.min_p,
                                         p.typical_p, p.frequency_penalty, p.presence_penalty)
            # STEP: the tokens it has generated so far (a recomputed sequence keeps its noise stream).
            host["int_settings"][i] = (p.top_k, seq.seed, seq.num_completion_tokens, p.min_new_tokens,
                                       p.no_repeat_ngram_size, len(multi), int(bool(single)), seq.num_prompt_tokens,
                                       len(p.logit_bias))
            if p.repetition_penalty != 1.0:  # every token it has seen, as flat indices slot * vocab + token
                seen_index[cursor:cursor + len(seq.token_ids)] = np.asarray(seq.token_ids, np.int64) + slot * vocab
                cursor += len(seq.token_ids)
        host["settings_slots"][:] = slots

    def load(self, views: dict[str, Tensor]) -> None:
        """Load the uploaded settings_fields into their slots' rows (the seen masks only where a penalty reads
        them)."""
        rows = views["settings_slots"]
        self.float_settings[rows] = views["float_settings"]
        self.int_settings[rows] = views["int_settings"]
        if views["seen_index"].numel():
            self.seen[rows] = False
            self.seen.view(-1).index_fill_(0, views["seen_index"], True)

    def load_processors(self, slots: Sequence[int], seqs: Sequence[SlotSequence]) -> None:
        """The processor state (eos and ban masks, patterns, logit_bias, history of all its tokens so far) of newly
        admitted sequences that need it, in an upload of its own."""
        vocab = self.vocab_size
        eos_index, ban_index, mask_rows, pattern_rows, patterns, history_index, history_values = ([] for _ in range(7))
        bias_index, bias_ids, bias_values = [], [], []  # flat index slot * MAX_LOGIT_BIAS + entry
        width = self.history.shape[1]
        for slot, seq in zip(slots, seqs, strict=True):
            p, tokens = seq.params, seq.token_ids
            if not p.needs_processors:
                continue
            eos = eos_token_ids(p, self.eos_token_id)
            single, multi = split_bad_words(p.bad_words_ids, eos)
            mask_rows.append(slot)
            eos_index += [slot * vocab + t for t in eos] if p.min_new_tokens else []
            ban_index += [slot * vocab + t for t in single]
            if multi:
                pattern_rows.append(slot)
                patterns.append(bad_word_patterns(multi))
            if p.needs_history:
                history_index += range(slot * width + HISTORY_MARGIN, slot * width + HISTORY_MARGIN + len(tokens))
                history_values += tokens
            bias_index += range(slot * MAX_LOGIT_BIAS, slot * MAX_LOGIT_BIAS + len(p.logit_bias))
            bias_ids += p.logit_bias
            bias_values += p.logit_bias.values()
        if not mask_rows:
            return
        pattern_shape = (len(pattern_rows), MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS)
        host_values = {"mask_rows": mask_rows, "eos_index": eos_index, "ban_index": ban_index,
                       "pattern_rows": pattern_rows, "patterns": np.asarray(patterns).reshape(pattern_shape),
                       "history_index": history_index, "history_values": history_values, "bias_index": bias_index,
                       "bias_ids": bias_ids, "bias_values": bias_values}
        fields = [(name, torch.float32 if name == "bias_values" else torch.int64,
                   np.shape(values) if name == "patterns" else (len(values),)) for name, values in host_values.items()]
        nbytes = PackedUpload.nbytes(fields)
        if nbytes > self._processor_uploads.capacity:  # rare and eager (an admission step): grow
            self._processor_uploads = PackedUpload(2 * nbytes, self.device)
        layout = self._processor_uploads.layout(fields)
        host = self._processor_uploads.host_views(layout)
        for name, values in host_values.items():
            host[name][...] = values
        up = self._processor_uploads.upload(layout)
        for mask, index in ((self.eos_mask, up["eos_index"]), (self.static_bans, up["ban_index"])):
            mask.index_fill_(0, up["mask_rows"], False)
            mask.view(-1).index_fill_(0, index, True)
        self.patterns.index_copy_(0, up["pattern_rows"], up["patterns"])
        self.history.view(-1).index_copy_(0, up["history_index"], up["history_values"])
        self.bias_ids.view(-1).index_copy_(0, up["bias_index"], up["bias_ids"])
        self.bias_values.view(-1).index_copy_(0, up["bias_index"], up["bias_values"])

    # ---- sampling --------------------------------------------------------------------------------------------

    def sample(self, logits: Tensor, rows: slice | Tensor, mode: SamplerMode, positions: Tensor | None = None,
               allowed: Tensor | None = None) -> None:
        """logits [rows, vocab] of the slots `rows` (a slice, or int64 slot ids) -> last_token[rows], row_max[rows];
        no host sync. positions (a decode step's, int32 [rows]): rows at -1 computed nothing (padding, a prompt
        still running in chunks, a fork child waiting for it, a finished row riding along); their noise step, seen
        tokens and history stay as they are. allowed (bool [slots, vocab], indexed like the slots: `rows` picks the
        step's): the tokens structured outputs' grammars allow, every token in an unconstrained row; None: no row is
        constrained. row_max stays the raw logits' (a masked token's NaN still fails its row)."""
        allowed_rows = allowed[rows] if allowed is not None else None
        if mode is SamplerMode.GREEDY:
            if allowed_rows is not None:
                self.row_max[rows] = logits.amax(dim=-1)
                self.last_token[rows] = logits.masked_fill(~allowed_rows, -torch.inf).argmax(dim=-1)
            elif isinstance(rows, slice):
                torch.max(logits, dim=-1, out=(self.row_max[rows], self.last_token[rows]))
            else:
                self.row_max[rows], self.last_token[rows] = logits.max(dim=-1)
            return
        self.row_max[rows] = logits.amax(dim=-1)
        row_ids = self._row_ids[rows] if isinstance(rows, slice) else rows  # int64 [rows]
        steps = self.int_settings[rows, STEP]
        processed = mode is SamplerMode.PROCESS
        lengths = self.int_settings[rows, PROMPT_LEN] + steps if processed else None  # tokens in the history
        ids = self._draw(logits, rows, steps, self.seen[rows], self.history[rows] if processed else None, lengths,
                         allowed_rows)
        self.last_token[rows] = ids
        if positions is None:  # every row sampled a token of its own
            if processed:
                self.history[row_ids, (HISTORY_MARGIN + lengths).clamp_(max=self.history.shape[1] - 1)] = ids
            self.int_settings[row_ids, STEP] += 1
            self.seen[row_ids, ids] = self._true
            return
        active = positions >= 0  # bool [rows]
        if processed:
            place = (HISTORY_MARGIN + lengths).clamp_(max=self.history.shape[1] - 1)
            self.history[row_ids, place] = torch.where(active, ids, self.history[row_ids, place])
        self.int_settings[row_ids, STEP] += active
        self.seen[row_ids, ids] |= active

    def _draw(self, logits: Tensor, rows: slice | Tensor, steps: Tensor, seen: Tensor, history: Tensor | None,
              lengths: Tensor | None, allowed: Tensor | None) -> Tensor:
        """Token ids [R] for logits [R, vocab] whose settings are those of slots `rows`; the token counter, seen
        mask and, with history (the PROCESS mode), the history and its lengths are the rows' own (a draft
        check position's differ from its slot's by the draft tokens before it); allowed (bool [R, vocab]) the
        tokens the rows' grammars allow, or None."""
        floats, ints = self.float_settings[rows], self.int_settings[rows]
        processors = None
        if history is not None:
            frequency, presence = floats[:, FREQUENCY_PENALTY], floats[:, PRESENCE_PENALTY]
            processors = RowProcessors(
                logit_bias=logit_bias_rows(self.bias_ids[rows], self.bias_values[rows], ints[:, NUM_BIASES],
                                           self.vocab_size),
                generated_counts=generated_counts(history, ints[:, PROMPT_LEN], lengths,
                                                  (frequency != 0) | (presence != 0), self.vocab_size),
                frequency_penalty=frequency, presence_penalty=presence,
                banned=banned_tokens(history=history, lengths=lengths, ngram_sizes=ints[:, NGRAM],
                                     patterns=self.patterns[rows], num_patterns=ints[:, NUM_PATTERNS],
                                     static_bans=self.static_bans[rows], has_static_bans=ints[:, HAS_BANS] > 0,
                                     eos_mask=self.eos_mask[rows], completion_lengths=steps,
                                     min_new_tokens=ints[:, MIN_NEW_TOKENS]),
                min_p=floats[:, MIN_P], typical_p=floats[:, TYPICAL_P])
        return sample_rows(logits, temperature=floats[:, TEMPERATURE], top_k=ints[:, TOP_K], top_p=floats[:, TOP_P],
                           penalty=floats[:, PENALTY], seeds=ints[:, SEED], steps=steps, seen=seen,
                           processors=processors, allowed=allowed)

    def sample_positions(self, logits: Tensor, position_pass: Tensor, position_offset: Tensor, pass_slots: Tensor,
                         pass_drafts: Tensor, mode: SamplerMode, allowed: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
        """Sample every position of P draft checks and keep each pass's agreeing drafts
        (engine.decoding.prompt_lookup).

        Pass p feeds slot pass_slots[p]'s last token and its drafts pass_drafts[p] (int64 [P, K], -1 padded);
        logits row r [R, vocab] is position position_offset[r] of pass position_pass[r]: the token after the last
        token and offset drafts, drawn as decoding token by token would draw it (noise counter, penalty, history
        and min_new_tokens all advanced by the drafts before it). A pass emits its sampled tokens up to the first
        that differs from the draft it checks, inclusive. Returns (emitted int64 [P, K + 1], -1 past each pass's
        count; count int64 [P]), and leaves the slots' state as if the emitted tokens were sampled one by one.
        allowed (bool [slots, vocab], as in `sample`): what the grammars allow; a constrained row never drafts, so its
        pass is the one position its mask was made for.
        """
        num_passes, width = pass_drafts.shape
        slots = pass_slots[position_pass]  # [R]
        allowed = allowed[slots] if allowed is not None else None
        if mode is SamplerMode.GREEDY:
            ids = (logits if allowed is None else logits.masked_fill(~allowed, -torch.inf)).argmax(dim=-1)
        else:
            drafts = pass_drafts[position_pass]  # [R, K]
            before = torch.arange(width, device=logits.device)[None, :] < position_offset[:, None]  # drafts fed
            base_steps = self.int_settings[slots, STEP]
            seen = self.seen[slots] | _token_mask(torch.where(before, drafts, -1), self.vocab_size)
            history = lengths = None
            if mode is SamplerMode.PROCESS:
                lengths = self.int_settings[slots, PROMPT_LEN] + base_steps
                history = self.history[slots]
                _write_history(history, lengths, torch.where(before, drafts, -1))
                lengths = lengths + position_offset
            ids = self._draw(logits, slots, base_steps + position_offset, seen, history, lengths, allowed)
        sampled = torch.full((num_passes, width + 1), -1, dtype=torch.int64, device=logits.device)
        sampled[position_pass, position_offset] = ids
        agree = (sampled[:, :width] == pass_drafts).to(torch.int64).cumprod(dim=1)
        count = agree.sum(dim=1) + 1  # [P]
        emitted = torch.where(torch.arange(width + 1, device=logits.device) < count[:, None], sampled, -1)
        self.last_token[pass_slots] = sampled.gather(1, (count - 1)[:, None])[:, 0]
        # row_max only flags non-finite logits: NaN where any position of the pass had some, else 0.
        nonfinite = torch.zeros(num_passes, dtype=torch.int64, device=logits.device).index_add_(
            0, position_pass, (~logits.amax(dim=-1).isfinite()).to(torch.int64))
        self.row_max[pass_slots] = torch.where(nonfinite > 0, torch.nan, 0.0).to(self.row_max.dtype)
        if mode is not SamplerMode.GREEDY:
            if mode is SamplerMode.PROCESS:
                history = self.history[pass_slots]
                _write_history(history, self.int_settings[pass_slots, PROMPT_LEN]
                               + self.int_settings[pass_slots, STEP], emitted)
                self.history[pass_slots] = history
            self.int_settings[pass_slots, STEP] += count
            self.seen[pass_slots] |= _token_mask(emitted, self.vocab_size)
        return emitted, count

    @property
    def row_max_bits_dtype(self) -> torch.dtype:
        """The integer dtype whose view of row_max the host tests for non-finite values."""
        return _EXPONENT_MASKS[self.logits_dtype][0]

    def nonfinite_rows(self, row_max_bits: np.ndarray) -> frozenset[int]:
        """Rows whose largest logit is NaN or inf, from a host copy of row_max viewed as row_max_bits_dtype."""
        mask = _EXPONENT_MASKS[self.logits_dtype][1]
        bad = (row_max_bits & mask) == mask
        return frozenset(np.flatnonzero(bad).tolist()) if bad.any() else frozenset()


def _token_mask(tokens: Tensor, vocab: int) -> Tensor:
    """bool [R, vocab]: True at each row's tokens (int64 [R, K]; -1 entries mark nothing)."""
    mask = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.bool, device=tokens.device)
    mask.scatter_(1, torch.where(tokens >= 0, tokens, vocab), True)
    return mask[:, :vocab]


def _write_history(history: Tensor, lengths: Tensor, tokens: Tensor) -> None:
    """Append tokens (int64 [R, K], -1 entries skipped) after each row's `lengths` tokens of history [R, W]."""
    columns = (HISTORY_MARGIN + lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)).clamp_(
        max=history.shape[1] - 1)
    history.scatter_(1, columns, torch.where(tokens >= 0, tokens, history.gather(1, columns)))
