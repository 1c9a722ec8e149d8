"""OpenVINO as an optional peer: skipped with the install hint where optimum-intel is missing (as in CI), its IR
cache keyed by the checkpoint's files, its int4 group fitted to the widths, and its settings printed as OpenVINO
prints them. The runs themselves need optimum-intel (bench/openvino_runner.py says how)."""

import enum
import os

import pytest
import torch

from hayabusa.bench import openvino_runner
from hayabusa.bench.report import _peer_settings_lines
from hayabusa.bench.runners import EngineUnavailable, make_runner
from hayabusa.engine.loading.config import PRESETS


def test_missing_openvino_is_a_skip_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(openvino_runner.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineUnavailable, match=r"openvino is not installed; pip install \"optimum-intel\[openv"):
        make_runner("openvino-int4", tmp_path, torch.float32, torch.device("cpu"), 4, True)
    with pytest.raises(EngineUnavailable, match="benchmarked on a CPU"):
        make_runner("openvino", tmp_path, torch.float32, torch.device("cuda"), 4, True)


def test_int4_group_follows_the_widths():
    assert openvino_runner.int4_group_size(PRESETS["2.7b"]) == 128
    assert openvino_runner.int4_group_size(PRESETS["tiny"]) == 32  # hidden 160


def test_fingerprint_changes_with_the_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    first = openvino_runner.checkpoint_fingerprint(tmp_path)
    assert openvino_runner.checkpoint_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"b" * 11)  # another size
    second = openvino_runner.checkpoint_fingerprint(tmp_path)
    assert second != first
    stat = (tmp_path / "model.safetensors").stat()  # the same size, rewritten later
    os.utime(tmp_path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert openvino_runner.checkpoint_fingerprint(tmp_path) not in (first, second)


class FakeElementType:
    def to_string(self) -> str:
        return "bf16"


class FakeMode(enum.Enum):
    PERFORMANCE = 1


def test_properties_print_as_openvino_prints_them():
    assert openvino_runner.property_text(FakeElementType()) == "bf16"
    assert openvino_runner.property_text(FakeMode.PERFORMANCE) == "PERFORMANCE"
    assert openvino_runner.property_text(32) == "32"


def test_report_names_each_variants_settings():
    settings = {"weight_format": "int8", "INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"}
    lines = _peer_settings_lines({"records": [{"engine": "openvino-int8", "extra": {"openvino": settings}},
                                               {"engine": "hayabusa-reference", "extra": {}}]})
    assert lines == ["- **openvino-int8 settings**: weight_format int8, INFERENCE_PRECISION_HINT bf16, "
                     "KV_CACHE_PRECISION u8, DYNAMIC_QUANTIZATION_GROUP_SIZE 32"]
