"""`hayabusa quantize SRC DST --scheme S` (its flags: engine/cli.py): write an fp checkpoint's weight-only
quantization as a compressed-tensors directory, the format llm-compressor writes, vLLM serves and transformers (with
`compressed-tensors` installed) loads.

Every layer's Linear weights are quantized round-to-nearest in the dtype they are stored in, with compressed-tensors'
arithmetic (kernels.compressed_tensors_format.quantize_rtn): the numbers llm-compressor's QuantizationModifier gives
for the same scheme with `ignore=["embed_out"]`, bit for bit, stored `pack-quantized` under the same names, with the
same quantization_config. The embeddings, LayerNorms, the last layer's dense bias and the LM head (embed_out) are
written as stored. The other files of SRC (tokenizer, generation config, licences) are copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from hayabusa.engine.loading.checkpoint_writer import clear_old_weights
from hayabusa.engine.loading.compressed_tensors_config import KEY, quantization_config_for
from hayabusa.engine.loading.config import load_config
from hayabusa.engine.loading.model_source import resolve_model_dir
from hayabusa.engine.loading.quant_schemes import WeightScheme, scheme_named
from hayabusa.engine.loading.quantized_tensors import QUANTIZE_DTYPES, check_groups
from hayabusa.engine.loading.tensor_names import EMBED_OUT, expected_shapes, layer_linear_weights
from hayabusa.engine.loading.weights import open_stored_weights
from hayabusa.kernels.compressed_tensors_format import quantize_rtn, to_pack_quantized
from hayabusa.tokenizer.hub import BIN_FILES, SAFETENSORS_FILES

WEIGHTS_FILE = "model.safetensors"


def quantize_checkpoint(source: str | Path, out_dir: str | Path, scheme: WeightScheme, *, revision: str | None = None,
                        overwrite: bool = False, progress: bool = True) -> Path:
    """Write `source`'s (a directory, hub id or random preset) quantization in `scheme` into `out_dir`."""
    model_dir = resolve_model_dir(source, revision)
    config = load_config(model_dir)
    raw_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if raw_config.get(KEY) is not None:
        raise ValueError(f"{model_dir} is quantized already (config.json has a '{KEY}'); quantize an fp checkpoint")
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"the output directory {out_dir} is the source; write the quantized checkpoint elsewhere")
    linears = layer_linear_weights(config)
    shapes = expected_shapes(config)
    for name in linears:
        check_groups(name, scheme, shapes[name][1], f"{scheme.name} quantizes")
    stored, read_tensor = open_stored_weights(model_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_old_weights(out_dir, overwrite)

    tensors: dict[str, torch.Tensor] = {}
    for name in tqdm([name for name in shapes if name in stored], desc=f"quantizing to {scheme.name}",
                     unit="tensor", disable=not progress, mininterval=0.5):
        tensor = read_tensor(name)
        if name not in linears:
            tensors[name] = tensor.contiguous()
            continue
        weight = tensor.to(QUANTIZE_DTYPES[tensor.dtype])
        packed = to_pack_quantized(quantize_rtn(weight, scheme.bits, scheme.group_size, scheme.symmetric))
        tensors |= {f"{name.removesuffix('weight')}{suffix}": value for suffix, value in packed.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config_out = {**raw_config, KEY: quantization_config_for(scheme, ignore=[EMBED_OUT.removesuffix(".weight")])}
    (out_dir / "config.json").write_text(json.dumps(config_out, indent=2) + "\n", encoding="utf-8")
    _copy_other_files(model_dir, out_dir)
    return out_dir


def _copy_other_files(model_dir: Path, out_dir: Path) -> None:
    """Every file of the source but its weights and config.json: the tokenizer's files, generation_config.json, ..."""
    weights = {p.name for pattern in SAFETENSORS_FILES + BIN_FILES for p in model_dir.glob(pattern)}
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.name not in weights | {"config.json"}:
            shutil.copyfile(path, out_dir / path.name)


def run(args: argparse.Namespace) -> int:
    scheme = scheme_named(args.scheme)
    out_dir = quantize_checkpoint(args.source, args.out_dir, scheme, revision=args.revision,
                                  overwrite=args.overwrite, progress=not args.quiet)
    size = (out_dir / WEIGHTS_FILE).stat().st_size
    print(f"wrote {out_dir}: {scheme.name} (int{scheme.bits}, "
          f"{'one scale per output channel' if scheme.group_size is None else f'groups of {scheme.group_size}'}, "
          f"{'symmetric' if scheme.symmetric else 'asymmetric'}) on every layer's Linear weights; embeddings and "
          f"embed_out as stored; {WEIGHTS_FILE} {size / 1e6:.1f} MB")
    return 0
