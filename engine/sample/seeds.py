"""The counter-based randomness of sampling: a request's n-th token draws Gumbel noise that is a hash of (seed, n,
token id), so a seeded request gives the same tokens whatever else shares its batch, and a request of
num_return_sequences completions (or best_of candidates) seeds completion j with `completion_seed(seed, j)`.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from hayabusa.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _to_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)
_COMPLETION_SALT = 0x5EED_F0E4  # completion seeds are not the noise keys of (seed, step)


def _logical_shift_right(x: Tensor, bits: int) -> Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping multiplication, logical shifts)."""
    x = x + _GOLDEN
    x = (x ^ _logical_shift_right(x, 30)) * _MIX1
    x = (x ^ _logical_shift_right(x, 27)) * _MIX2
    return x ^ _logical_shift_right(x, 31)


def gumbel_noise(seeds: Tensor, steps: Tensor, vocab: int) -> Tensor:
    """Standard Gumbel noise [B, V], a pure function of (seed, step, token id)."""
    token = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    key = _splitmix64(_splitmix64(seeds)[:, None] ^ steps[:, None])  # [B, 1]
    bits = _logical_shift_right(_splitmix64(key ^ token[None, :]), 11)  # 53 random bits
    uniform = (bits.double() + 0.5) / float(1 << 53)  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).float()


def request_seed(params: SamplingParams) -> int:
    """The seed that keys a request's sampling noise: params.seed, or a fresh random one when it is None."""
    return params.seed if params.seed is not None else random.getrandbits(62)


def completion_seed(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded `seed` (num_return_sequences > 1). Completion 0 keeps the
    request's seed, so it equals the request's num_return_sequences=1 output; completion j > 0 takes the SplitMix64
    hash of (seed, j), below 2**63. So completion j equals a num_return_sequences=1 request with this seed."""
    if index == 0:
        return seed
    key = _splitmix64(_splitmix64(torch.tensor(seed ^ _COMPLETION_SALT, dtype=torch.int64)) ^ index)
    return int(key) & ((1 << 63) - 1)
