"""Where hayabusa runs: one check of a device name before anything loads, and the one-time notice that Triton
kernels on a CPU run under Triton's interpreter (a correctness check, far too slow for real use).

torch loads when a device is resolved, not with this module: every command's parser adds --device from here, and
`hayabusa COMMAND --help` must not wait for torch.
"""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


class InterpreterWarning(UserWarning):
    """Triton kernels are running on a CPU under TRITON_INTERPRET: right answers, minutes per few tokens."""


_interpreter_warned = False


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, as every command spells it; the CLI checks it with resolve_device before the command runs."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch.device to run on (None: cuda when available, else cpu), or a ValueError saying why `device` cannot
    be used here: not a device name, a type hayabusa does not run on, no CUDA in this torch or machine, or a CUDA
    index past the visible devices. Cheap: nothing is initialised on the device."""
    import torch

    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r}: hayabusa runs on cpu or cuda (cuda:N), not {parsed.type}")
    if parsed.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) is built without CUDA; use "
                             f"cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA device on this machine (check the driver "
                             f"and CUDA_VISIBLE_DEVICES); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) visible, cuda:0 to cuda:{count - 1}")
    return parsed


def warn_if_interpreted(device: torch.device, instead: str) -> None:
    """Warn once per process when Triton kernels are about to run on a CPU (only possible under TRITON_INTERPRET);
    `instead` says what to use for speed."""
    global _interpreter_warned
    if device.type != "cpu" or _interpreter_warned:
        return
    _interpreter_warned = True
    warnings.warn(f"the Triton kernels run on this CPU under Triton's interpreter: that checks their correctness "
                  f"and is very slow (minutes for a few tokens of a small model); {instead}", InterpreterWarning,
                  stacklevel=3)
