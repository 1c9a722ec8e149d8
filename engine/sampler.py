"""Per-slot sampling state on the device, and the sampling step that feeds the next decode without the host.

Row `slot` of each tensor belongs to the running sequence in that slot (engine.slots): its settings, its noise
step counter and, for the repetition penalty, its seen-token mask. `sample` reads a batch's logits and writes the
chosen ids straight into `last_token[rows]` (the next decode step's input ids) and each row's largest raw logit
into `row_max[rows]`; the host reads both back one step later. A non-finite row max flags a row whose logits hold
NaN or +inf, or no finite value at all: that request fails with an error instead of a silent token.

Launches per call: the greedy path (every row greedy, no penalty) is one `max` reduction that writes the ids and
row maxima together; the general path runs `sampling.sample_rows` plus the bookkeeping (about 90 small kernels,
half of them the counter-based noise hash: a fused sampling kernel is the obvious next step).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hayabusa.engine.sampling import SamplingParams, effective_temperature, sample_rows

# Columns of the settings tensors.
TEMPERATURE, TOP_P, PENALTY = 0, 1, 2  # float_settings; temperature 0 marks a greedy row
TOP_K, SEED, STEP = 0, 1, 2  # int_settings; STEP counts the row's sampled tokens (it keys the noise)

# Exponent bits of each dtype: all ones means inf or NaN.
_EXPONENT_MASKS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                   torch.bfloat16: (torch.int16, 0x7F80)}


def settings_row(params: SamplingParams, seed: int, step: int) -> tuple[tuple[float, float, float],
                                                                         tuple[int, int, int]]:
    """(float_settings, int_settings) of one sequence's slot row."""
    return ((effective_temperature(params), params.top_p, params.repetition_penalty), (params.top_k, seed, step))


class SlotSampler:
    def __init__(self, max_num_seqs: int, vocab_size: int, logits_dtype: torch.dtype, device: torch.device) -> None:
        if logits_dtype not in _EXPONENT_MASKS:
            raise ValueError(f"logits dtype must be one of {tuple(_EXPONENT_MASKS)}, got {logits_dtype}")
        self.logits_dtype = logits_dtype
        self.last_token = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)  # next decode's input ids
        self.row_max = torch.zeros(max_num_seqs, dtype=logits_dtype, device=device)
        self.float_settings = torch.ones(max_num_seqs, 3, dtype=torch.float32, device=device)
        self.int_settings = torch.zeros(max_num_seqs, 3, dtype=torch.int64, device=device)
        # Read only where a penalty is set (a penalty of 1 leaves a logit exactly as it is), so only the rows of
        # sequences with a penalty are ever initialised; max_num_seqs x vocab bytes (8 MB for 256 x 32k).
        self.seen = torch.zeros(max_num_seqs, vocab_size, dtype=torch.bool, device=device)

    def per_slot_tensors(self) -> list[Tensor]:
        """The tensors whose rows move with a sequence when it changes slot."""
        return [self.last_token, self.float_settings, self.int_settings, self.seen]

    def load(self, rows: slice, float_settings: Tensor, int_settings: Tensor, seen_index: Tensor | None) -> None:
        """Settings of newly admitted rows; seen_index: flat indices (row * vocab + token) of every token the
        penalised ones have seen, or None when none of them has a penalty."""
        self.float_settings[rows] = float_settings
        self.int_settings[rows] = int_settings
        if seen_index is not None:
            self.seen[rows] = False
            self.seen.view(-1).index_fill_(0, seen_index, True)

    def load_rows(self, slots: Tensor, float_settings: Tensor, int_settings: Tensor) -> None:
        """Settings of running rows (int64 [k] slots; sequences forked since the last step: their own seeds)."""
        self.float_settings.index_copy_(0, slots, float_settings)
        self.int_settings.index_copy_(0, slots, int_settings)

    def sample(self, logits: Tensor, rows: slice, greedy_only: bool) -> None:
        """logits [rows, vocab] of slots rows.start.. -> last_token[rows], row_max[rows]; no host sync."""
        if greedy_only:
            torch.max(logits, dim=-1, out=(self.row_max[rows], self.last_token[rows]))
            return
        torch.amax(logits, dim=-1, out=self.row_max[rows])
        floats, ints = self.float_settings[rows], self.int_settings[rows]
        seen = self.seen[rows]
        ids = sample_rows(logits, temperature=floats[:, TEMPERATURE], top_k=ints[:, TOP_K], top_p=floats[:, TOP_P],
                          penalty=floats[:, PENALTY], seeds=ints[:, SEED], steps=ints[:, STEP], seen=seen)
        self.last_token[rows] = ids
        ints[:, STEP] += 1
        seen.scatter_(1, ids[:, None], True)

    @property
    def row_max_bits_dtype(self) -> torch.dtype:
        """The integer dtype whose view of row_max the host tests for non-finite values."""
        return _EXPONENT_MASKS[self.logits_dtype][0]

    def nonfinite_rows(self, row_max_bits: np.ndarray) -> frozenset[int]:
        """Rows whose largest logit is NaN or inf, from a host copy of row_max viewed as row_max_bits_dtype."""
        mask = _EXPONENT_MASKS[self.logits_dtype][1]
        bad = (row_max_bits & mask) == mask
        return frozenset(np.flatnonzero(bad).tolist()) if bad.any() else frozenset()
