"""The weight-only quantization schemes hayabusa writes and quantizes to on load, by name, and the `--quantization` flag
every command spells the same way. Imports no torch: the commands' parsers read it.

    name            bits  scale per                 zero point   llm-compressor / compressed-tensors 0.19
    W8A16           8     group of 128 columns      none (sym)   preset "W8A16"
    W4A16           4     group of 128 columns      none (sym)   preset "W4A16"
    W4A16_ASYM      4     group of 128 columns      per group    preset "W4A16_ASYM"
    W8A16_CHANNEL   8     output channel (row)      none (sym)   strategy "channel", num_bits 8, symmetric

`int8` names W8A16_CHANNEL (one scale per output channel: what torch's packed int8 CPU kernel,
`torch._weight_int8pack_mm`, computes) and `int4` names W4A16 (what `torch._weight_int4pack_mm_for_cpu` computes with
groups of 128, symmetric). Activations stay in the model dtype ("A16"): only the weights are quantized.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class WeightScheme:
    """Round-to-nearest integer weights: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = k // group_size."""

    bits: int  # 8 or 4
    group_size: int | None  # input columns per scale; None: one scale per output channel
    symmetric: bool  # True: zero point 0, none stored

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for where the scales sit."""
        return "channel" if self.group_size is None else "group"

    @property
    def name(self) -> str:
        """The preset name of this scheme, or a description of one that is no preset (a checkpoint's own)."""
        for name, scheme in SCHEMES.items():
            if scheme == self:
                return name
        where = "per channel" if self.group_size is None else f"group {self.group_size}"
        return f"int{self.bits} {where} {'symmetric' if self.symmetric else 'asymmetric'}"


SCHEMES: dict[str, WeightScheme] = {
    "W8A16": WeightScheme(8, 128, True),
    "W4A16": WeightScheme(4, 128, True),
    "W4A16_ASYM": WeightScheme(4, 128, False),
    "W8A16_CHANNEL": WeightScheme(8, None, True),
}
ALIASES = {"int8": "W8A16_CHANNEL", "int4": "W4A16"}
QUANTIZATION_CHOICES = (*ALIASES, *SCHEMES)


def scheme_named(name: str) -> WeightScheme:
    """The scheme `name` (a preset or an alias) stands for, or ValueError listing the names."""
    scheme = SCHEMES.get(ALIASES.get(name, name))
    if scheme is None:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {name!r}")
    return scheme


def add_quantization_argument(parser: argparse.ArgumentParser) -> None:
    """--quantization, as every command that loads a model spells it."""
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default=None,
                        help="quantize the weights of every layer's linear layers while loading (round to nearest): "
                             "int8 = W8A16_CHANNEL (one scale per output channel), int4 = W4A16 (groups of 128, "
                             "symmetric); a checkpoint quantized already (compressed-tensors) loads as stored without "
                             "this flag (default: the checkpoint's weights as stored)")
