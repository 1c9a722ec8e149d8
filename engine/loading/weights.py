"""Load a checkpoint's weights as a flat HF-named state dict: every tensor checked before use, then moved to the
target device and dtype one by one; `embed_out` shares `embed_in` exactly when transformers ties them.

A Linear's weight is a tensor, or a QuantizedWeight: stored quantized (a compressed-tensors checkpoint, see
compressed_tensors_config.py and quantized_tensors.py) or quantized while loading (`quantization`).

On the CPU a tensor stored in the load dtype stays the memory-mapped one the reader returns (no copy), and the
others are converted straight from the mapping into one huge-page arena (host_arena.py)."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from hayabusa.engine.loading.compressed_tensors_config import CheckpointQuantization, read_checkpoint_quantization
from hayabusa.engine.loading.config import ConfigError, ModelConfig, describe_defaults, load_config
from hayabusa.engine.loading.host_arena import host_tensors
from hayabusa.engine.loading.model_source import resolve_model_dir
from hayabusa.engine.loading.pickle_scan import pickle_code_globals, refused_global
from hayabusa.engine.loading.quant_schemes import WeightScheme
from hayabusa.engine.loading.quantized_tensors import (
    TensorSpec,
    check_groups,
    quantize_weight,
    read_quantized,
    stored_tensor_specs,
)
from hayabusa.engine.loading.tensor_names import (
    EMBED_IN,
    EMBED_OUT,
    LinearWeight,
    expected_shapes,
    layer_linear_weights,
    weight_modules,
)

# Buffers that older transformers versions saved with the weights; hayabusa recomputes them, so they are dropped.
KNOWN_BUFFER = re.compile(r"^gpt_neox_japanese\.layers\.(\d+)\.attention\.(rotary_emb\.inv_freq|bias|masked_bias)$")
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# safetensors header dtype code -> torch dtype, for the float dtypes hayabusa loads (also what init-random writes)
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# ... and the integer ones of quantized checkpoints (codes, zero points, shapes)
SAFETENSORS_INT_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                          "I64": torch.int64}
# Checked in this order, as transformers does: safetensors before PyTorch pickles, a single file before an index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
_MAX_LISTED_PROBLEMS = 12
HALF_CONVERSION_BLOCK = 1 << 20  # fp32 elements (4 MiB) per step of an fp16 <-> bf16 conversion
# The config keys expected_shapes() reads: when config.json lacks one, its default is the likely culprit.
SHAPE_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_multiple_size"]
QUANTIZE_PROGRESS_MIN_BYTES = 256 * 2**20  # a progress bar while quantizing on load from this many weight bytes on


class CheckpointError(ValueError):
    """Weights that cannot be this model's: missing, unexpected, wrong-shaped, non-float or unreadable tensors."""


@dataclass(frozen=True)
class StoredTensor:
    """What a checkpoint file says about one tensor, read before any data is."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a str when safetensors holds a dtype torch has none for (e.g. "BOOL")


def load_model_files(name_or_path: str, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                     revision: str | None = None, quantization: WeightScheme | None = None
                     ) -> tuple[Path, ModelConfig, dict[str, LinearWeight]]:
    """Resolve a model spec (directory, random preset or Hub id), read its config.json, load its validated weights."""
    model_dir = resolve_model_dir(name_or_path, revision)
    config = load_config(model_dir)
    return model_dir, config, load_weights(model_dir, config, dtype=dtype, device=device, quantization=quantization)


def load_weights(model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                 quantization: WeightScheme | None = None) -> dict[str, LinearWeight]:
    """HF name -> tensor on `device` in `dtype`, buffers dropped; a quantized Linear's "X.weight" -> QuantizedWeight
    (scales in `dtype`). Every name, shape and dtype is validated before a tensor is loaded. When tied,
    `sd[EMBED_OUT] is sd[EMBED_IN]`.

    quantization: quantize every layer's Linear weights (not the embeddings, not the LM head) round-to-nearest while
    loading, in the dtype each is stored in (as `hayabusa quantize` writes them); refused for a checkpoint that is
    quantized already."""
    if dtype not in FLOATING_DTYPES:
        raise CheckpointError(f"load dtype must be one of {FLOATING_DTYPES}, got {dtype!r}")
    device = torch.device(device)
    model_dir = Path(model_dir)
    stored, read_tensor = _open_checkpoint(model_dir)
    checkpoint_quantization = read_quantization(model_dir, config)
    if quantization is not None:
        check_quantizable(model_dir, config, quantization, checkpoint_quantization)
    specs = expected_tensors(config, checkpoint_quantization)
    needed = _validate(model_dir, stored, config, specs)
    shapes = expected_shapes(config)
    modules = checkpoint_quantization.modules.items() if checkpoint_quantization is not None else ()
    state_dict: dict[str, LinearWeight] = {
        f"{module}.weight": read_quantized(module, module_quantization, shapes[f"{module}.weight"], read_tensor,
                                           set(stored), dtype, device) for module, module_quantization in modules}
    if quantization is not None:
        state_dict |= _quantized_on_load(layer_linear_weights(config), stored, read_tensor, quantization, dtype,
                                         device)
    dense = [name for name in needed if specs[name].dtypes is None and name not in state_dict]
    state_dict |= _materialize(dense, stored, read_tensor, dtype, device)
    return _tie_embeddings(state_dict, config)


def check_quantizable(model_dir: Path, config: ModelConfig, scheme: WeightScheme,
                      stored: CheckpointQuantization | None) -> None:
    """CheckpointError for a checkpoint quantized already; ValueError for a layer width the groups do not tile."""
    if stored is not None:
        raise CheckpointError(f"{model_dir} is quantized already ({stored.describe()}); load it as stored, without a "
                              f"quantization ({scheme.name}) on top")
    shapes = expected_shapes(config)
    for name in layer_linear_weights(config):
        check_groups(name, scheme, shapes[name][1], f"quantization {scheme.name} quantizes")


def open_stored_weights(model_dir: Path, config: ModelConfig
                        ) -> tuple[dict[str, StoredTensor], Callable[[str], Tensor]]:
    """An unquantized checkpoint's parameters as stored (validated, buffers dropped): (name -> StoredTensor,
    read_tensor(name) -> the stored CPU tensor, each name read once)."""
    stored, read_tensor = _open_checkpoint(model_dir)
    needed = _validate(model_dir, stored, config, expected_tensors(config, None))
    return {name: stored[name] for name in needed}, read_tensor


def read_quantization(model_dir: Path, config: ModelConfig) -> CheckpointQuantization | None:
    """What config.json's quantization_config quantizes (None: nothing, or no config.json beside weights loaded with
    a config of their own), or ConfigError naming the key."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return read_checkpoint_quantization(json.loads(path.read_text(encoding="utf-8")), weight_modules(config))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def expected_tensors(config: ModelConfig, quantization: CheckpointQuantization | None) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must store -> its spec: the model's parameters, a quantized Linear's weight
    replaced by the tensors its format stores."""
    specs: dict[str, TensorSpec] = {}
    for name, shape in expected_shapes(config).items():
        module = name.removesuffix(".weight")
        if quantization is not None and module in quantization.modules:
            specs |= stored_tensor_specs(module, quantization.modules[module], shape)
        else:
            specs[name] = TensorSpec(shape)
    return specs


def _quantized_on_load(names: list[str], stored: dict[str, StoredTensor], read_tensor: Callable[[str], Tensor],
                       scheme: WeightScheme, dtype: torch.dtype, device: torch.device) -> dict[str, LinearWeight]:
    """Each of `names` read from the checkpoint and quantized on `device`, one at a time (no fp copy stays)."""
    total = sum(math.prod(stored[name].shape) * stored[name].dtype.itemsize for name in names)
    quantized: dict[str, LinearWeight] = {}
    with tqdm(names, desc=f"quantizing to {scheme.name}", unit="linear", mininterval=0.5,
              disable=total < QUANTIZE_PROGRESS_MIN_BYTES) as bar:
        for name in bar:
            quantized[name] = quantize_weight(read_tensor(name), scheme, dtype, device)
    if device.type == "cuda":  # hand the temporaries' cached blocks back: the KV pool is sized from free memory
        torch.cuda.empty_cache()
    return quantized


def _materialize(names: list[str], stored: dict[str, StoredTensor], read_tensor: Callable[[str], Tensor],
                 dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """name -> contiguous tensor on `device` in `dtype`; each stored tensor is read once and converted once."""
    if device.type != "cpu":
        return {name: read_tensor(name).to(device=device, dtype=dtype).contiguous() for name in names}
    converted = host_tensors({name: (stored[name].shape, dtype) for name in names if stored[name].dtype != dtype})
    return {name: _convert_into(converted[name], read_tensor(name)) if name in converted
            else read_tensor(name).contiguous() for name in names}


def _convert_into(target: Tensor, source: Tensor) -> Tensor:
    """target.copy_(source), with fp16 <-> bf16 taken through an fp32 block: torch converts that pair element by
    element (1.6 GB/s here) but each half <-> fp32 step vectorized (7 GB/s together); every step is exact or
    rounds once, so the bits are the same."""
    halves = (torch.float16, torch.bfloat16)
    if target.dtype not in halves or source.dtype not in halves:
        return target.copy_(source)
    flat_target, flat_source = target.view(-1), source.reshape(-1)
    block = torch.empty(min(HALF_CONVERSION_BLOCK, flat_source.numel()), dtype=torch.float32)
    for start in range(0, flat_source.numel(), block.numel()):
        piece = block[:flat_source.numel() - start].copy_(flat_source[start:start + block.numel()])
        flat_target[start:start + piece.numel()].copy_(piece)
    return target


def _tie_embeddings(state_dict: dict[str, LinearWeight], config: ModelConfig) -> dict[str, LinearWeight]:
    """transformers 5 (checked in tests/loading/test_weights.py): with `tie_word_embeddings` (default true) a missing
    embed_out -- or a missing embed_in -- is shared with the other, a stored embed_out equal to embed_in (after
    conversion to the load dtype) is shared too, and a different one (a quantized one) stays untied."""
    if config.tie_word_embeddings:
        if EMBED_OUT not in state_dict:
            state_dict[EMBED_OUT] = state_dict[EMBED_IN]
        elif EMBED_IN not in state_dict:
            state_dict[EMBED_IN] = state_dict[EMBED_OUT]
        elif isinstance(state_dict[EMBED_OUT], Tensor) and torch.equal(state_dict[EMBED_OUT], state_dict[EMBED_IN]):
            state_dict[EMBED_OUT] = state_dict[EMBED_IN]
    order = list(expected_shapes(config))
    return {name: state_dict[name] for name in order}


def _validate(model_dir: Path, stored: dict[str, StoredTensor], config: ModelConfig,
              specs: dict[str, TensorSpec]) -> list[str]:
    """The stored names to load, or a CheckpointError listing every problem (tensor and file named)."""
    problems: list[str] = []
    needed: list[str] = []
    for name, info in stored.items():
        buffer = KNOWN_BUFFER.match(name)
        if buffer and int(buffer.group(1)) < config.num_hidden_layers:
            continue
        if name not in specs:
            problems.append(f"unexpected tensor '{name}' in {info.file.name}")
            continue
        spec = specs[name]
        if info.shape != spec.shape:
            problems.append(f"tensor '{name}' in {info.file.name} has shape {list(info.shape)}, "
                            f"expected {list(spec.shape)} from config.json")
        if info.dtype not in (spec.dtypes or FLOATING_DTYPES):
            expected = "a float dtype" if spec.dtypes is None else " or ".join(map(str, spec.dtypes))
            problems.append(f"tensor '{name}' in {info.file.name} has dtype {info.dtype}, expected {expected}")
        needed.append(name)
    optional = {name for name, spec in specs.items() if spec.optional}
    if config.tie_word_embeddings:  # either embedding may stand in for the other, not both
        optional |= {EMBED_OUT} if EMBED_IN in stored else {EMBED_IN} if EMBED_OUT in stored else set()
    files = sorted({info.file.name for info in stored.values()})
    for name in specs:
        if name not in stored and name not in optional:
            untied_out = name == EMBED_OUT and not config.tie_word_embeddings
            tie_note = " (tie_word_embeddings is false, so embed_out must be stored)" if untied_out else ""
            problems.append(f"missing tensor '{name}' (looked in {', '.join(files) or 'no tensors'}){tie_note}")
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
        defaults = describe_defaults(config.defaulted_keys, SHAPE_KEYS)
        cause = f"; {defaults}, which the tensors may not have" if defaults else ""
        raise CheckpointError(f"checkpoint {model_dir} does not match its config.json ({len(problems)} problem(s))"
                              f"{cause}:\n  " + "\n  ".join(listed) + more)
    return needed


def _open_checkpoint(model_dir: Path) -> tuple[dict[str, StoredTensor], Callable[[str], Tensor]]:
    """(name -> StoredTensor for every stored tensor, read_tensor(name) -> CPU tensor), reading headers only."""
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        found = sorted(p.name for p in model_dir.iterdir())
        raise CheckpointError(f"{model_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)} "
                              f"(found: {', '.join(found) or 'nothing'})")
    chosen = model_dir / present[0]
    # file -> the tensor names the index places there (None for a single unindexed file)
    files = _index_shards(chosen) if chosen.name.endswith(".index.json") else {chosen: None}
    return _open_safetensors(files) if chosen.name.startswith("model.") else _open_bin(files)


def _index_shards(index_path: Path) -> dict[Path, list[str] | None]:
    """shard file -> tensor names the index says it holds; every shard must exist."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("'weight_map' is not a non-empty object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"index {index_path} is unreadable: {type(err).__name__}: {err}") from None
    shards: dict[Path, list[str] | None] = {}
    for name, shard_name in weight_map.items():
        shard = index_path.parent / str(shard_name)
        if not shard.is_file():
            raise CheckpointError(f"index {index_path.name} puts tensor '{name}' in shard {shard_name}, "
                                  f"which is missing from {index_path.parent}")
        shards.setdefault(shard, []).append(name)
    return shards


def _open_safetensors(files: dict[Path, list[str] | None]) -> tuple[dict[str, StoredTensor], Callable[[str], Tensor]]:
    stored: dict[str, StoredTensor] = {}
    handles = {}
    for path, names_from_index in files.items():
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            file_names = list(handle.keys())
            infos = {}
            for name in file_names:
                header = handle.get_slice(name)
                code = header.get_dtype()
                dtype = SAFETENSORS_DTYPES.get(code) or SAFETENSORS_INT_DTYPES.get(code, code)
                infos[name] = StoredTensor(path, tuple(header.get_shape()), dtype)
        except Exception as err:  # safetensors raises its own SafetensorError for truncated or corrupt files
            raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({err})") from None
        _check_against_index(path, file_names, names_from_index, stored)
        stored |= infos
        handles[path] = handle

    def read_tensor(name: str) -> Tensor:
        info = stored[name]
        try:
            return handles[info.file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor '{name}' from {info.file}: {err}") from None

    return stored, read_tensor


def _open_bin(files: dict[Path, list[str] | None]) -> tuple[dict[str, StoredTensor], Callable[[str], Tensor]]:
    stored: dict[str, StoredTensor] = {}
    tensors: dict[str, Tensor] = {}
    for path, names_from_index in files.items():
        file_tensors = _torch_load(path)
        _check_against_index(path, list(file_tensors), names_from_index, stored)
        stored |= {name: StoredTensor(path, tuple(t.shape), t.dtype) for name, t in file_tensors.items()}
        tensors |= file_tensors
    return stored, tensors.pop


def _torch_load(path: Path) -> dict[str, Tensor]:
    """A .bin state dict, memory-mapped; `weights_only` refuses any pickle that would run code."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # a pre-1.6 (non-zip) torch.save file cannot be memory-mapped
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = refused_global(err) or next(iter(pickle_code_globals(path)), None)
        if code is None:
            raise CheckpointError(f"cannot read {path}: truncated, or not a PyTorch checkpoint of tensors "
                                  f"(torch.load with weights_only=True refused it)") from None
        raise CheckpointError(f"{path} holds code, not only tensors: its pickle calls the Python global {code}. "
                              f"hayabusa loads tensors only and ran none of it; get the weights as safetensors or "
                              f"from a source you trust") from None
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, expected a state dict of tensors")
    for name, value in loaded.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"entry '{name}' in {path.name} is a {type(value).__name__}, expected a tensor")
    return loaded


def _check_against_index(path: Path, file_names: list[str], names_from_index: list[str] | None,
                         stored_so_far: dict[str, StoredTensor]) -> None:
    """Every tensor the index places in `path` is there, and `path` holds nothing the index does not know."""
    for name in file_names:
        if name in stored_so_far:
            raise CheckpointError(f"tensor '{name}' is stored twice: in {stored_so_far[name].file.name} "
                                  f"and {path.name}")
    if names_from_index is None:
        return
    missing = sorted(set(names_from_index) - set(file_names))
    if missing:
        raise CheckpointError(f"the index places tensor '{missing[0]}' in {path.name}, but that shard does not hold "
                              f"it ({len(missing)} such tensor(s))")
    extra = sorted(set(file_names) - set(names_from_index))
    if extra:
        raise CheckpointError(f"shard {path.name} holds tensor '{extra[0]}', which the index does not list "
                              f"({len(extra)} such tensor(s))")
