"""A checkpoint's `quantization_config` (in config.json) in compressed-tensors' format, as llm-compressor writes it:
which Linear layers hold quantized weights, in which scheme and storage format (`read_checkpoint_quantization`);
and the same config for a checkpoint hayabusa writes (`quantization_config_for`).

Read here, by hand, not through the `compressed-tensors` package: the loader needs a few keys of one JSON object, the
package would be a dependency of every install (it pulls transformers), and its objects would still have to be
checked against what the kernels run. What is loaded: weight-only integer schemes (`type: int`, 4 or 8 bits,
`strategy` group (power-of-two groups of at least 32 columns) or channel, symmetric or not), stored
`pack-quantized` (what llm-compressor writes for them), `naive-quantized` or `int-quantized` (one int8 per weight).
Anything else (activation quantization such as W8A8, fp8 and fp4 types, other bit widths and strategies, GPTQ's
`actorder: group`, sparsity, transforms, KV-cache quantization) is refused with the key and value named, never
loaded as wrong numbers.

Which modules a config group covers follows compressed-tensors' matching: a target is a module's class name
("Linear"), its exact name, or "re:" and a regular expression matched at the start of the name; an exact name wins
over a regular expression, which wins over a class name; `ignore` (same forms) excludes modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hayabusa.engine.loading.config import ConfigError
from hayabusa.engine.loading.quant_schemes import WeightScheme

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
INT8_FORMATS = ("naive-quantized", "int-quantized")  # one int8 per weight: q itself
LOADED_FORMATS = (PACKED_FORMAT, *INT8_FORMATS)
MIXED_FORMAT = "mixed-precision"  # the global format when groups differ; each group then names its own
MIN_GROUP_SIZE = 32  # kernels.quantized_weight.MIN_GROUP_SIZE (that module imports torch)
ACTORDERS_WITHOUT_G_IDX = (None, "weight", "static")  # "group" / "dynamic" store a column permutation (g_idx)
KEY = "quantization_config"


@dataclass(frozen=True)
class ModuleQuantization:
    """How one Linear's weight is stored."""

    scheme: WeightScheme
    format: str  # one of LOADED_FORMATS


@dataclass(frozen=True)
class CheckpointQuantization:
    modules: dict[str, ModuleQuantization]  # quantized Linear module name -> how its weight is stored

    def describe(self) -> str:
        """E.g. "W4A16 (pack-quantized) on 128 linear layers"."""
        counts: dict[str, int] = {}
        for module in self.modules.values():
            label = f"{module.scheme.name} ({module.format})"
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{label} on {count} linear layer{'s' * (count > 1)}" for label, count in counts.items())


def read_checkpoint_quantization(raw: dict[str, Any], modules: dict[str, str]) -> CheckpointQuantization | None:
    """The quantized Linear modules of a checkpoint whose config.json is `raw` (None: no quantization_config), or
    ConfigError naming the key and value hayabusa does not load.

    modules: every module holding a weight that a config group could target -> its class name ("Linear",
    "Embedding"); only Linear weights may be quantized.
    """
    config = raw.get(KEY)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ConfigError(f"config key '{KEY}' must be an object, got {config!r}")
    method = config.get("quant_method")
    if method != QUANT_METHOD:
        raise ConfigError(f"config key '{KEY}.quant_method' is {method!r}; hayabusa loads '{QUANT_METHOD}' checkpoints "
                          "(llm-compressor's format; its GPTQ and AWQ output is one)")
    _refuse_extras(config)
    status = config.get("quantization_status")
    if status != "compressed":
        raise ConfigError(f"config key '{KEY}.quantization_status' is {status!r}; hayabusa loads 'compressed' "
                          "checkpoints (llm-compressor's save_pretrained(..., save_compressed=True))")
    global_format = config.get("format")
    if global_format not in (*LOADED_FORMATS, MIXED_FORMAT):
        raise ConfigError(f"config key '{KEY}.format' is {global_format!r}; hayabusa loads "
                          f"{', '.join(map(repr, LOADED_FORMATS))} weights")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"config key '{KEY}.config_groups' must be a non-empty object, got {groups!r}")
    target_to_group: dict[str, tuple[str, ModuleQuantization]] = {}  # later groups win a shared target
    for group_name, group in groups.items():
        quantization = _group_quantization(f"{KEY}.config_groups.{group_name}", group, global_format)
        for target in _strings(f"{KEY}.config_groups.{group_name}.targets", group.get("targets")):
            target_to_group[target] = (group_name, quantization)
    ignore = _strings(f"{KEY}.ignore", config.get("ignore") or [])
    quantized: dict[str, ModuleQuantization] = {}
    for module, class_name in modules.items():
        matched = _matched_targets(module, class_name, list(target_to_group))
        if not matched or _matched_targets(module, class_name, ignore):
            continue
        group_name, quantization = target_to_group[matched[0]]
        if class_name != "Linear":
            raise ConfigError(f"config key '{KEY}.config_groups.{group_name}' quantizes {module} (a {class_name}); "
                              "hayabusa quantizes Linear weights only (add it to 'ignore')")
        quantized[module] = quantization
    if not quantized:
        raise ConfigError(f"config key '{KEY}' quantizes none of the model's Linear layers (targets "
                          f"{sorted(target_to_group)}, ignore {ignore})")
    return CheckpointQuantization(quantized)


def _refuse_extras(config: dict[str, Any]) -> None:
    """KV-cache quantization, sparsity and transforms change what the weights mean: refused."""
    for key, what in (("kv_cache_scheme", "KV-cache quantization"), ("sparsity_config", "sparse weights"),
                      ("transform_config", "weight transforms (rotations)")):
        if config.get(key):
            raise ConfigError(f"config key '{KEY}.{key}' is {config[key]!r}: {what}, which hayabusa does not run")


def _group_quantization(where: str, group: Any, global_format: str) -> ModuleQuantization:
    """One config group's scheme and format, or ConfigError naming what hayabusa does not run."""
    if not isinstance(group, dict):
        raise ConfigError(f"config key '{where}' must be an object, got {group!r}")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise ConfigError(f"config key '{where}.{key}' is {group[key]!r}: activation quantization (e.g. W8A8), "
                              "which hayabusa does not run; it runs weight-only schemes (W8A16, W4A16, ...)")
    group_format = group.get("format") or global_format
    if group_format not in LOADED_FORMATS:
        raise ConfigError(f"config key '{where}.format' is {group_format!r}; hayabusa loads "
                          f"{', '.join(map(repr, LOADED_FORMATS))} weights")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ConfigError(f"config key '{where}.weights' must be an object, got {weights!r}")
    where = f"{where}.weights"
    checks = [("type", weights.get("type"), ("int",), "integer weights (fp8 and fp4 are not supported)"),
              ("num_bits", weights.get("num_bits"), (4, 8), "4- and 8-bit weights"),
              ("strategy", weights.get("strategy"), ("group", "channel"), "a scale per group or per output channel"),
              ("symmetric", weights.get("symmetric"), (True, False), "true or false"),
              ("dynamic", weights.get("dynamic", False), (False,), "static weight scales"),
              ("actorder", weights.get("actorder"), ACTORDERS_WITHOUT_G_IDX,
               "weights in column order (GPTQ's actorder 'group' stores a permutation, g_idx)"),
              ("block_structure", weights.get("block_structure"), (None,), "no blocks")]
    for key, value, allowed, meaning in checks:
        if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
            raise ConfigError(f"config key '{where}.{key}' is {value!r}; hayabusa runs {meaning}: "
                              f"{' or '.join(map(repr, allowed))}")
    group_size = None
    if weights["strategy"] == "group":
        group_size = weights.get("group_size")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE \
                or group_size & (group_size - 1):
            raise ConfigError(f"config key '{where}.group_size' is {group_size!r}; hayabusa runs groups of a power "
                              f"of two >= {MIN_GROUP_SIZE} columns")
    return ModuleQuantization(WeightScheme(weights["num_bits"], group_size, weights["symmetric"]), group_format)


def _strings(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"config key '{where}' must be a list of strings, got {value!r}")
    return value


def _matched_targets(module: str, class_name: str, targets: list[str]) -> list[str]:
    """The targets matching the module, most specific first: exact names, regular expressions, class names."""
    by_name = [t for t in sorted(targets, key=lambda t: (t.startswith("re:"), t)) if _name_matches(module, t)]
    return by_name + [t for t in targets if t == class_name and t not in by_name]


def _name_matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target.removeprefix("re:"), module) is not None
        except re.error as err:
            raise ConfigError(f"config key '{KEY}' holds the target {target!r}, not a regular expression: {err}") \
                from None
    return target == module


def quantization_config_for(scheme: WeightScheme, ignore: list[str]) -> dict[str, Any]:
    """The quantization_config llm-compressor (0.14, compressed-tensors 0.19) writes for `scheme` on every Linear but
    `ignore`, stored pack-quantized: the same keys and values, so every tool that reads its checkpoints reads ours."""
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": scheme.group_size,
               "num_bits": scheme.bits, "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None,
               "strategy": scheme.strategy, "symmetric": scheme.symmetric, "type": "int",
               "zp_dtype": None if scheme.symmetric else "torch.int8"}
    group = {"format": PACKED_FORMAT, "input_activations": None, "output_activations": None, "targets": ["Linear"],
             "weights": weights}
    return {"config_groups": {"group_0": group}, "format": PACKED_FORMAT, "global_compression_ratio": None,
            "ignore": list(ignore), "kv_cache_scheme": None, "quant_method": QUANT_METHOD,
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}}
