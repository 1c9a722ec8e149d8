"""Write a random-weight checkpoint that transformers and hayabusa both load: abeja's tensor names, shapes and
config keys, the tokenizer files, random values made tensor by tensor (safetensors are streamed to disk block by
block; a .bin shard is held in memory whole, so shard big .bin checkpoints).

Also the `hayabusa init-random` subcommand (`add_init_random_arguments`, `run_init_random`)."""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import re
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from hayabusa.engine.loading.config import DTYPES, PRESETS, ModelConfig
from hayabusa.engine.loading.tensor_names import EMBED_IN, EMBED_OUT, expected_shapes
from hayabusa.engine.loading.weights import SAFETENSORS_DTYPES
from hayabusa.tokenizer.hub import BIN_FILES, SAFETENSORS_FILES

FORMATS = ("safetensors", "bin")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
INIT_STD = 0.02  # transformers' initializer_range for this model
POOL_SIZE = 2**22  # normal draws shared by all tensors of one checkpoint (see RandomValues)
CHUNK = 8192  # elements per window into the pool
BLOCK_CHUNKS = 1024  # windows gathered per step: an 8M-element buffer, reused
PROGRESS_MIN_BYTES = 256 * 2**20  # show a progress bar from this size on (when progress is not forced)
TOKENIZER_CONFIG = {  # transformers' GPTNeoXJapaneseTokenizer defaults, spelled out so AutoTokenizer finds the class
    "tokenizer_class": "GPTNeoXJapaneseTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_clean_text": False,
}


def parse_size(text: str | int) -> int:
    """Bytes from "2GB" (10**9), "500MiB" (2**20), "4096" ... as transformers' max_shard_size reads them."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise ValueError(f"shard size {text!r} is not a size such as 2GB, 500MB or 1GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").lower()])
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


def write_random_checkpoint(out_dir: str | Path, config: ModelConfig, *, fmt: str = "safetensors",
                            shard_size: int | str | None = None, dtype: torch.dtype = torch.float16, seed: int = 0,
                            store_embed_out: bool = True, overwrite: bool = False,
                            progress: bool | None = None, init_std: float = INIT_STD) -> Path:
    """Write config.json, the tokenizer files and random weights into `out_dir` (created if needed).

    Like abeja/gpt-neox-japanese-2.7b, the weights hold embed_in and a different embed_out, so transformers keeps
    them untied whatever the tie key says; config.json carries `tie_word_embeddings` only when it is false.
    `store_embed_out=False` writes no embed_out: a tied model (needs `config.tie_word_embeddings`).
    `shard_size` (bytes or "2GB"): split the weights into HF-named shards plus the index json; None: one file.
    Values are drawn per tensor from `seed`, so they do not depend on the format or the sharding. `init_std`: the
    spread of the values (see RandomValues); tests raise it so attention and MLP weigh in the logits as much as the
    embeddings do, where transformers' 0.02 leaves a tiny model's attention nearly uniform.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if not store_embed_out and not config.tie_word_embeddings:
        raise ValueError("store_embed_out=False needs config.tie_word_embeddings: an untied model must store embed_out")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_old_weights(out_dir, overwrite)

    shapes = expected_shapes(config)
    if not store_embed_out:
        del shapes[EMBED_OUT]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, itemsize, parse_size(shard_size) if shard_size is not None else None)
    total_bytes = sum(math.prod(shape) for shape in shapes.values()) * itemsize
    show = total_bytes >= PROGRESS_MIN_BYTES if progress is None else progress
    # A small model needs no 4M-draw pool (the draws would dominate writing it), so the pool follows the model size.
    model_numel = sum(math.prod(shape) for shape in expected_shapes(config).values())
    values = RandomValues(seed, dtype, pool_size=min(POOL_SIZE, model_numel), std=init_std)
    file_names = _shard_file_names(fmt, len(shards))
    write = _write_safetensors if fmt == "safetensors" else _write_bin
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {out_dir.name}", disable=not show,
              mininterval=0.5) as bar:
        for file_name, names in zip(file_names, shards, strict=True):
            write(out_dir / file_name, {name: shapes[name] for name in names}, values, bar)
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, names in zip(file_names, shards, strict=True) for name in names}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    _write_config(out_dir, config, dtype)
    write_tokenizer_files(out_dir, config)
    return out_dir


def write_tokenizer_files(out_dir: Path, config: ModelConfig) -> None:
    """vocab.txt and emoji.json from hayabusa.tokenizer's vendored vocabulary, its licence, tokenizer_config.json."""
    vocab = resources.files("hayabusa.tokenizer").joinpath("vocab")
    for source, target in (("vocab.txt", "vocab.txt"), ("emoji.json", "emoji.json"), ("LICENSE", "VOCAB_LICENSE")):
        with vocab.joinpath(source).open("rb") as src, open(out_dir / target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tokenizer_config = {**TOKENIZER_CONFIG, "model_max_length": config.max_position_embeddings}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def _write_config(out_dir: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    hf_config = config.to_hf_dict()
    if config.tie_word_embeddings:  # abeja's config.json has no tie key; transformers' default is true
        del hf_config["tie_word_embeddings"]
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")


def clear_old_weights(out_dir: Path, overwrite: bool) -> None:
    """Old weight files would be read instead of (or mixed with) the new ones: refuse, or remove them."""
    old = sorted({p.name for pattern in SAFETENSORS_FILES + BIN_FILES for p in out_dir.glob(pattern)})
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds weights ({', '.join(old)}); choose an empty directory "
                              "or overwrite (--overwrite)")
    for name in old:
        (out_dir / name).unlink()


class RandomValues:
    """Values for every tensor of a checkpoint: N(0, std), LayerNorm gains 1 + N(0, std) (std 0.02 by default), so
    every bias (the last layer's dense_bias included) is small but nonzero.

    Drawing 2.7B normals takes over a minute on a small CPU, so a tensor is instead a run of CHUNK-long windows, at
    offsets drawn from (seed, tensor name), into one pool of POOL_SIZE normals drawn from `seed`: gathering windows
    runs at memory speed. The values depend on nothing but (seed, name, pool_size) -- not on the format, the
    sharding or the other tensors stored -- and differ between tensors, whose offsets come from different names."""

    def __init__(self, seed: int, dtype: torch.dtype, pool_size: int = POOL_SIZE, std: float = INIT_STD) -> None:
        self.seed, self.dtype, self.pool_size = seed, dtype, pool_size
        normals = torch.randn(pool_size + CHUNK, generator=torch.Generator().manual_seed(seed))
        self.pools = {"weight": (normals * std).to(dtype), "gain": (normals * std + 1.0).to(dtype)}
        self.buffer = torch.empty(BLOCK_CHUNKS, CHUNK, dtype=dtype)  # reused: fresh pages are slow to fault in

    def blocks(self, name: str, numel: int) -> Iterator[torch.Tensor]:
        """The tensor's values flattened, as consecutive 1-D views of a reused buffer (use each before the next)."""
        generator = torch.Generator().manual_seed((self.seed * 2**32 + zlib.crc32(name.encode())) % 2**63)
        num_chunks = -(-numel // CHUNK)
        offsets = torch.randint(0, self.pool_size, (num_chunks,), generator=generator)
        gain = name.endswith("layernorm.weight") or name == "gpt_neox_japanese.final_layer_norm.weight"
        windows = self.pools["gain" if gain else "weight"].unfold(0, CHUNK, 1)  # [pool_size + 1, CHUNK], a view
        for first in range(0, num_chunks, BLOCK_CHUNKS):
            rows = offsets[first:first + BLOCK_CHUNKS]
            block = self.buffer[: len(rows)]
            torch.index_select(windows, 0, rows, out=block)
            yield block.view(-1)[: numel - first * CHUNK]

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        flat = torch.empty(math.prod(shape), dtype=self.dtype)
        start = 0
        for block in self.blocks(name, flat.numel()):
            flat[start:start + block.numel()] = block
            start += block.numel()
        return flat.view(shape)


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_size: int | None) -> list[list[str]]:
    """Consecutive tensors per shard, each shard at most `shard_size` bytes unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shard_size is not None and shards[-1] and shard_bytes + nbytes > shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def _shard_file_names(fmt: str, count: int) -> list[str]:
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if count == 1:
        return [f"{stem}.{suffix}"]
    return [f"{stem}-{i:05d}-of-{count:05d}.{suffix}" for i in range(1, count + 1)]


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], values: RandomValues, bar: tqdm) -> None:
    """The safetensors layout written as a stream: u64 header length, JSON header (offsets into the data that
    follows, padded with spaces to 8 bytes), then each tensor's little-endian bytes, drawn and written one by one."""
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian machine")
    dtype = values.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    dtype_code = next(code for code, code_dtype in SAFETENSORS_DTYPES.items() if code_dtype == dtype)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype_code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for name, shape in shapes.items():  # the same order as the offsets above
            for block in values.blocks(name, math.prod(shape)):
                file.write(_raw_bytes(block))
                bar.update(block.numel() * itemsize)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, without a copy (and without needing numpy)."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return memoryview((ctypes.c_ubyte * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr()))


def _write_bin(path: Path, shapes: dict[str, tuple[int, ...]], values: RandomValues, bar: tqdm) -> None:
    """A torch.save state dict (one shard in memory at a time)."""
    shard = {}
    for name, shape in shapes.items():
        shard[name] = values.tensor(name, shape)
        bar.update(shard[name].numel() * shard[name].element_size())
    torch.save(shard, path)


def run_init_random(args: argparse.Namespace) -> int:
    config = PRESETS[args.preset]
    if args.untied:
        config = config.with_overrides(tie_word_embeddings=False)
    # A FileExistsError (a directory that already holds weights), a full disk, ...: reported by the CLI.
    out_dir = write_random_checkpoint(args.out_dir, config, fmt=args.fmt, shard_size=args.shard_size,
                                      dtype=DTYPES[args.dtype], seed=args.seed, store_embed_out=not args.tied,
                                      overwrite=args.overwrite, progress=False if args.quiet else None)
    params = sum(math.prod(shape) for name, shape in expected_shapes(config).items()
                 if not (args.tied and name == EMBED_OUT))
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"wrote {out_dir}: preset {args.preset}, {params / 1e6:.1f}M parameters stored as {args.dtype} "
          f"({'embed_out tied to ' + EMBED_IN if args.tied else 'untied embed_out'}); files: {', '.join(files)}")
    return 0
