"""Name the Python code a PyTorch .bin checkpoint would run if it were unpickled freely, without running any.

A pickle calls code through the globals it names (GLOBAL / INST / STACK_GLOBAL opcodes): a state dict of tensors
names only torch's rebuild functions and storages and `collections.OrderedDict`; anything else (`posix.system`,
a class from someone's training script) is code hayabusa will not run. Used to explain why
`torch.load(weights_only=True)` refused a file; the opcodes are read with pickletools, nothing is executed.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

# Globals a torch.save of tensors names besides torch's own (bytes in protocol 2 go through _codecs.encode).
TENSOR_PICKLE_GLOBALS = frozenset({"collections.OrderedDict", "_codecs.encode"})
# A legacy (non-zip) torch.save file is pickles back to back: magic number, protocol, system info, the data (whose
# globals matter), the storage keys, then raw storage bytes, which must not be parsed as opcodes.
_MAX_PICKLES = 4
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def refused_global(error: Exception) -> str | None:
    """The global torch's weights-only unpickler names in its refusal ("... GLOBAL posix.system ..."), if any."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return describe_global(match.group(1)) if match else None


def pickle_code_globals(path: str | Path) -> list[str]:
    """The globals other than tensor rebuilding that the checkpoint's pickle names, in order of appearance."""
    found: list[str] = []
    for name in _pickle_globals(path):
        if not (name.split(".")[0] == "torch" or name in TENSOR_PICKLE_GLOBALS) and name not in found:
            found.append(name)
    return [describe_global(name) for name in found]


def describe_global(name: str) -> str:
    """posix.system -> "posix.system (os.system)": os functions pickle under the platform module's name."""
    module, _, attribute = name.partition(".")
    return f"{name} (os.{attribute})" if module in ("posix", "nt") and attribute else name


def _pickle_globals(path: str | Path) -> list[str]:
    with open(path, "rb") as file:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return _scan(io.BytesIO(archive.read(member))) if member else []
        file.seek(0)
        return _scan(file)


def _scan(stream: io.BufferedIOBase) -> list[str]:
    """'module.name' of every global named by the pickles at the start of `stream` (until one fails to parse)."""
    names: list[str] = []
    for _ in range(_MAX_PICKLES):
        pushed: list[object] = []  # what the opcodes pushed, as far as a global's name needs (strings, memo reads)
        memo: dict[int, object] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(".".join(str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    names.append(f"{pushed[-2]}.{pushed[-1]}")
                if opcode.name in _STRING_OPS:
                    pushed.append(arg)
                elif opcode.name in _GET_OPS:
                    pushed.append(memo.get(arg))
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif opcode.name in _PUT_OPS:
                    memo[arg] = pushed[-1] if pushed else None
                else:
                    pushed.append(None)  # some other value: keeps the last two pushes honest for STACK_GLOBAL
        except (ValueError, EOFError):  # the raw storage bytes after the last pickle, or a damaged file
            break
    return names
