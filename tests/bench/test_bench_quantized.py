"""`hayabusa bench --quantization`: hayabusa's engines once per scheme beside transformers, each decode figure's weight
bytes and bandwidth floor in the format the engine holds (codes, scales, zero points), and a quantized checkpoint run
as stored (transformers decompressing it)."""

import json

import pytest

from hayabusa.bench import cli, report
from hayabusa.engine.api import Engine
from hayabusa.engine.loading.quant_schemes import SCHEMES
from hayabusa.engine.loading.quantize_checkpoint import quantize_checkpoint

FAST = ["--device", "cpu", "--sizes", "smoke", "--scenarios", "decode", "--decode-batches", "1", "--repeats", "1",
        "--engines", "hayabusa-reference,transformers-eager"]


def decode_records(out):
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["errors"] == [], results["errors"]
    return results, {(r["engine"], r["quantization"]): r for r in results["records"] if r["scenario"] == "decode"}


def test_every_scheme_runs_beside_transformers_with_its_own_bytes_and_floor(tmp_path) -> None:
    out = tmp_path / "out"
    assert cli.main(["--model", "tiny", "--out", str(out), *FAST, "--quantization", "none", "int8"]) == 0
    results, records = decode_records(out)
    assert set(records) == {("hayabusa-reference", None), ("hayabusa-reference", "W8A16_CHANNEL"),
                            ("transformers-eager", None)}
    dense, int8 = records["hayabusa-reference", None], records["hayabusa-reference", "W8A16_CHANNEL"]
    assert int8["extra"]["weight_bytes_per_step"] == \
        Engine.from_pretrained("tiny", quantization="int8").paged.model.weight_bytes_per_decode_step(1)
    assert dense["extra"]["weight_bytes_per_step"] == records["transformers-eager", None]["extra"][
        "weight_bytes_per_step"] > int8["extra"]["weight_bytes_per_step"]
    for record in (dense, int8):  # the floor follows the bytes: weights of the format + the KV cache
        kv_bytes = record["extra"]["bytes_per_step"] - record["extra"]["weight_bytes_per_step"]
        assert kv_bytes == dense["extra"]["bytes_per_step"] - dense["extra"]["weight_bytes_per_step"] > 0
        assert record["extra"]["floor_ms_per_step"] == pytest.approx(
            record["extra"]["bytes_per_step"] / results["roofline"]["copy_gb_per_s"] / 1e6)
    table = report.markdown_report(results)
    dense_format = {"float32": "fp32", "bfloat16": "bf16"}[results["dtype"]]
    assert f"| hayabusa-reference | {dense_format} | 1 |" in table
    assert "| hayabusa-reference W8A16_CHANNEL | int8 | 1 |" in table
    assert table.index(f"| hayabusa-reference | {dense_format} | 1 |") < \
        table.index("| hayabusa-reference W8A16_CHANNEL | int8 | 1 |")


def test_a_quantized_checkpoint_runs_as_stored_in_every_engine(tmp_path, capsys) -> None:
    pytest.importorskip("compressed_tensors")
    checkpoint = quantize_checkpoint("tiny", tmp_path / "int8", SCHEMES["W8A16_CHANNEL"], progress=False)
    out = tmp_path / "out"
    assert cli.main(["--model", str(checkpoint), "--out", str(out), *FAST]) == 0
    _, records = decode_records(out)
    assert set(records) == {("hayabusa-reference", "W8A16_CHANNEL"), ("transformers-eager", None)}
    assert cli.main(["--model", str(checkpoint), "--out", str(out), *FAST, "--quantization", "int4"]) == 1
    assert f"--quantization W4A16: {checkpoint} is quantized already (W8A16_CHANNEL (pack-quantized) on 8 " \
        "linear layers)" in capsys.readouterr().err
    assert cli.main(["--model", "tiny", "--out", str(out), *FAST, "--quantization", "W4A16"]) == 1
    assert "--quantization W4A16: quantization W4A16 quantizes in groups of 128 columns, but 'gpt_neox_japanese" \
        ".layers.0.attention.query_key_value.weight' has 160" in capsys.readouterr().err
    assert cli.main(["--model", "tiny", "--out", str(out), *FAST, "--quantization", "int3"]) == 1
    assert "--quantization: unknown 'int3'; choose from none, int8, int4, W8A16" in capsys.readouterr().err
