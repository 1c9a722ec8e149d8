"""OpenVINO (through optimum-intel) as an optional peer on a CPU: the one other engine that runs GPT-NeoX-Japanese
fast there. Used when `optimum.intel` and `openvino` import (pip install "optimum-intel[openvino]"; they need a
transformers older than the one hayabusa's tests use, so they live in an environment of their own).

Variants, as `optimum-cli export openvino --weight-format ...` writes them: "openvino" an fp32 IR (which OpenVINO
computes in bf16 on a CPU with native bf16, its default), "openvino-int8" int8 weights (asymmetric, per output
channel), "openvino-int4" int4 weights (asymmetric, groups of 128, or 32 where a width is not a multiple of 128;
embedding and LM head in int8). Each IR is exported once per checkpoint into the hayabusa cache and reused.

Timing is transformers' (TransformersRunner.generate: optimum's model is a transformers GenerationMixin): the same
token ids, forced lengths and first-token clock. OpenVINO gets the run's thread count (INFERENCE_NUM_THREADS) and
one stream; every record carries the settings the compiled model reports (INFERENCE_PRECISION_HINT,
KV_CACHE_PRECISION, DYNAMIC_QUANTIZATION_GROUP_SIZE, ...), which decide what its figures mean.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hayabusa.bench.roofline import WEIGHT_FORMAT_BYTES, decode_weight_bytes
from hayabusa.bench.runners import EngineUnavailable, TransformersRunner
from hayabusa.engine.loading.config import ModelConfig
from hayabusa.engine.loading.random_models import cache_root

WEIGHT_FORMATS = {"openvino": "fp32", "openvino-int8": "int8", "openvino-int4": "int4"}
INT4_GROUP = 128  # optimum's int4 default; widths that are not a multiple fall back to FALLBACK_INT4_GROUP
FALLBACK_INT4_GROUP = 32
REPORTED_PROPERTIES = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
                       "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT", "EXECUTION_MODE_HINT")
INSTALL_HINT = 'pip install "optimum-intel[openvino]" (transformers < 5.6; keep it in its own environment)'


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None when it can."""
    for module in ("openvino", "optimum.intel"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed; {INSTALL_HINT}"
        except (ImportError, ValueError) as err:
            return f"{module} is not importable ({err}); {INSTALL_HINT}"
    return None


def int4_group_size(config: ModelConfig) -> int:
    widths = (config.hidden_size, config.intermediate_size)
    return INT4_GROUP if all(w % INT4_GROUP == 0 for w in widths) else FALLBACK_INT4_GROUP


class OpenVinoRunner(TransformersRunner):
    def __init__(self, name: str, model_dir: Path, device: torch.device, static_batch: int) -> None:
        if device.type != "cpu":
            raise EngineUnavailable(f"{name} is benchmarked on a CPU (this run is on {device})")
        missing = openvino_missing()
        if missing:
            raise EngineUnavailable(missing)
        # dtype is the checkpoint's as exported (fp32): OpenVINO chooses its own compute precision
        super().__init__(name, False, model_dir, torch.float32, device, static_batch)
        self.weight_format = WEIGHT_FORMATS[name]  # "fp32" until the compiled model says it computes in bf16
        self.config = ModelConfig.from_json(model_dir / "config.json")
        self.settings: dict[str, Any] = {}

    def load(self) -> None:
        from optimum.intel import OVModelForCausalLM

        threads = torch.get_num_threads()
        ov_config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                     "CACHE_DIR": ""}
        model = OVModelForCausalLM.from_pretrained(self.exported_ir(), ov_config=ov_config, compile=True)
        model.generation_config.eos_token_id = None  # forced length, as TransformersRunner.load
        compiled = model.request.get_compiled_model()
        supported = {str(p) for p in compiled.get_property("SUPPORTED_PROPERTIES")}
        self.settings = {"weight_format": self.weight_format, **{
            key: property_text(compiled.get_property(key)) for key in REPORTED_PROPERTIES if key in supported}}
        if self.weight_format == "int4":
            self.settings["int4_group_size"] = int4_group_size(self.config)
        if self.settings.get("INFERENCE_PRECISION_HINT") == "bf16" and self.weight_format == "fp32":
            self.weight_format = "bf16"  # the fp32 IR's weights run (and stream) as bf16
        self.model = model

    def weight_bytes_per_step(self, config: ModelConfig, batch: int) -> int:
        return round(decode_weight_bytes(config, batch, WEIGHT_FORMAT_BYTES[self.weight_format]))

    def record_facts(self) -> dict[str, Any]:
        return {"openvino": dict(self.settings)}

    def exported_ir(self) -> Path:
        """The variant's IR directory, exported on first use (minutes for 2.7B) and kept in the hayabusa cache."""
        target = cache_root() / "openvino" / f"{self.model_dir.name}-{checkpoint_fingerprint(self.model_dir)}" \
            / self.weight_format
        if (target / "openvino_model.xml").is_file():
            return target
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        quantization: dict[str, Any] = {"load_in_8bit": False}  # optimum would compress a >1B model to int8
        if self.weight_format == "int8":
            quantization = {"quantization_config": OVWeightQuantizationConfig(bits=8, sym=False)}
        elif self.weight_format == "int4":
            quantization = {"quantization_config": OVWeightQuantizationConfig(
                bits=4, sym=False, group_size=int4_group_size(self.config), ratio=1.0)}
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            model = OVModelForCausalLM.from_pretrained(self.model_dir, export=True, compile=False, **quantization)
            model.save_pretrained(scratch)
            del model
            shutil.rmtree(target, ignore_errors=True)  # a partial IR of an earlier interrupted run
            Path(scratch).rename(target)
            Path(scratch).mkdir()  # for TemporaryDirectory's own cleanup
        return target


def property_text(value: Any) -> str:
    """An OpenVINO property as OpenVINO's own tools print it: "bf16" for an element type, "PERFORMANCE" for an
    enum member."""
    if hasattr(value, "to_string"):
        return value.to_string()
    return getattr(value, "name", None) or str(value)


def checkpoint_fingerprint(model_dir: Path) -> str:
    """A short hash of the directory's files (names, sizes, modification times): a changed checkpoint re-exports."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    text = "\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{model_dir.resolve()}\n{text}".encode()).hexdigest()[:12]
