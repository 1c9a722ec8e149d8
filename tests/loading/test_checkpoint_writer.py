"""init-random: abeja's config keys, tokenizer files, tensor names and shapes, random values transformers can run."""

import json
from importlib import resources

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer
from transformers.utils import logging as hf_logging

from hayabusa.engine.cli import main
from hayabusa.engine.loading.checkpoint_writer import parse_size, write_random_checkpoint
from hayabusa.engine.loading.config import PRESETS, ModelConfig, load_config
from hayabusa.engine.loading.tensor_names import EMBED_IN, EMBED_OUT, expected_shapes
from hayabusa.engine.loading.weights import load_weights

hf_logging.set_verbosity_error()

MICRO = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    max_position_embeddings=64, bos_token_id=95, eos_token_id=95)
LAST_DENSE_BIAS = "gpt_neox_japanese.layers.2.attention.dense_bias"


def stored_tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor in the directory's safetensors or bin files, read without hayabusa's loader."""
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(path)
    for path in sorted(model_dir.glob("*.bin")):
        tensors |= torch.load(path, weights_only=True)
    return tensors


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                            ("64KiB", 65536), ("4096", 4096), (" 10 kb ", 10_000), (123, 123)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 GiGa", "-1GB", "0", "1e9", 0])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="shard size"):
        parse_size(text)


def test_config_json_has_abeja_keys(tmp_path):
    write_random_checkpoint(tmp_path, PRESETS["2.7b"].with_overrides(num_hidden_layers=1), dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rotary_pct"] == 1.0 and raw["rotary_emb_base"] == 10000.0
    assert raw["bos_token_id"] == raw["eos_token_id"] == 31999
    assert "tie_word_embeddings" not in raw  # like abeja's config.json
    assert "rope_parameters" not in raw and "partial_rotary_factor" not in raw
    assert raw["model_type"] == "gpt_neox_japanese" and raw["architectures"] == ["GPTNeoXJapaneseForCausalLM"]
    assert raw["torch_dtype"] == "bfloat16"
    assert load_config(tmp_path) == PRESETS["2.7b"].with_overrides(num_hidden_layers=1)


def test_untied_config_writes_the_tie_key(tmp_path):
    write_random_checkpoint(tmp_path, MICRO.with_overrides(tie_word_embeddings=False))
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert EMBED_OUT in stored_tensors(tmp_path)


def test_tokenizer_files(tmp_path):
    write_random_checkpoint(tmp_path, MICRO)
    vocab = resources.files("hayabusa.tokenizer").joinpath("vocab")
    for name in ("vocab.txt", "emoji.json"):
        assert (tmp_path / name).read_bytes() == vocab.joinpath(name).read_bytes()
    assert (tmp_path / "VOCAB_LICENSE").read_bytes() == vocab.joinpath("LICENSE").read_bytes()
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(auto, GPTNeoXJapaneseTokenizer)
    direct = GPTNeoXJapaneseTokenizer(vocab_file=str(tmp_path / "vocab.txt"), emoji_file=str(tmp_path / "emoji.json"))
    text = "人とAIが協調するためには、😀 2024年"
    assert auto.encode(text) == direct.encode(text) and len(auto.encode(text)) > 5
    assert (auto.eos_token_id, auto.bos_token_id, auto.model_max_length) == (31999, 31996, 64)


def test_tensor_names_shapes_and_values(tmp_path):
    write_random_checkpoint(tmp_path, MICRO, dtype=torch.float32)
    tensors = stored_tensors(tmp_path)
    shapes = expected_shapes(MICRO)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes
    assert not torch.equal(tensors[EMBED_OUT], tensors[EMBED_IN])  # abeja stores two different embeddings
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        assert (tensor != 0).all(), name  # every bias too, the last layer's dense_bias included
        is_gain = name.endswith("layernorm.weight") or name == "gpt_neox_japanese.final_layer_norm.weight"
        center = 1.0 if is_gain else 0.0
        assert abs(tensor.mean().item() - center) < 0.01, name
        assert 0.012 < tensor.std().item() < 0.028, name
    assert tensors[LAST_DENSE_BIAS].abs().min() > 0


def test_init_std_sets_the_spread(tmp_path):
    tensors = stored_tensors(write_random_checkpoint(tmp_path, MICRO, dtype=torch.float32, init_std=0.5))
    assert 0.4 < tensors[EMBED_IN].std().item() < 0.6
    assert 0.4 < (tensors["gpt_neox_japanese.final_layer_norm.weight"] - 1).std().item() < 0.6


def test_values_do_not_depend_on_format_or_sharding(tmp_path):
    reference = stored_tensors(write_random_checkpoint(tmp_path / "single", MICRO, dtype=torch.float32))
    for fmt in ("safetensors", "bin"):
        for shard_size in (None, "10KB"):
            other = stored_tensors(write_random_checkpoint(tmp_path / f"{fmt}-{shard_size}", MICRO, fmt=fmt,
                                                           shard_size=shard_size, dtype=torch.float32))
            assert other.keys() == reference.keys()
            assert all(torch.equal(other[name], reference[name]) for name in reference), (fmt, shard_size)
    tied = stored_tensors(write_random_checkpoint(tmp_path / "tied", MICRO, dtype=torch.float32,
                                                  store_embed_out=False))
    assert EMBED_OUT not in tied and torch.equal(tied[EMBED_IN], reference[EMBED_IN])
    reseeded = stored_tensors(write_random_checkpoint(tmp_path / "seed1", MICRO, dtype=torch.float32, seed=1))
    assert not any(torch.equal(reseeded[name], reference[name]) for name in reference)
    half = stored_tensors(write_random_checkpoint(tmp_path / "fp16", MICRO, dtype=torch.float16))
    assert all(torch.equal(half[name], reference[name].half()) for name in reference)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_shards_respect_the_size_and_index(tmp_path, fmt):
    shard_size = 12_000
    write_random_checkpoint(tmp_path, MICRO, fmt=fmt, shard_size=shard_size, dtype=torch.float32)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    index = json.loads((tmp_path / f"{stem}.{suffix}.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"{stem}-{i:05d}-of-{len(files):05d}.{suffix}" for i in range(1, len(files) + 1)]
    assert len(files) > 3 and not (tmp_path / f"{stem}.{suffix}").exists()
    assert list(index["weight_map"]) == list(expected_shapes(MICRO))  # consecutive tensors, HF order
    shapes = expected_shapes(MICRO)
    total = 0
    for file in files:
        names = [name for name, shard in index["weight_map"].items() if shard == file]
        nbytes = sum(4 * torch.Size(shapes[name]).numel() for name in names)
        assert nbytes <= shard_size or len(names) == 1, file  # only a tensor bigger than a shard stands alone
        total += nbytes
    assert index["metadata"]["total_size"] == total


def test_safetensors_header_is_standard(tmp_path):
    write_random_checkpoint(tmp_path, MICRO, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_slice(EMBED_IN).get_dtype() == "BF16"
        assert set(handle.keys()) == set(expected_shapes(MICRO))
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded so the data starts aligned


@pytest.mark.parametrize(("store_embed_out", "tie", "fmt"), [(True, True, "safetensors"), (False, True, "bin"),
                                                              (True, False, "safetensors")])
def test_transformers_runs_a_written_checkpoint(tmp_path, store_embed_out, tie, fmt):
    config = PRESETS["tiny"].with_overrides(tie_word_embeddings=tie)
    write_random_checkpoint(tmp_path, config, fmt=fmt, dtype=torch.float32, store_embed_out=store_embed_out)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tied = model.embed_out.weight.data_ptr() == model.gpt_neox_japanese.embed_in.weight.data_ptr()
    assert tied == (not store_embed_out)
    ours = load_weights(tmp_path, load_config(tmp_path), dtype=torch.float32)
    assert (ours[EMBED_OUT] is ours[EMBED_IN]) == tied
    input_ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 17, config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.01
    assert (logits.argmax(-1) != logits.argmax(-1)[0, 0]).any()  # not a constant prediction


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        write_random_checkpoint(tmp_path, MICRO, fmt="gguf")
    with pytest.raises(ValueError, match="dtype"):
        write_random_checkpoint(tmp_path, MICRO, dtype=torch.float64)
    with pytest.raises(ValueError, match="untied model must store embed_out"):
        write_random_checkpoint(tmp_path, MICRO.with_overrides(tie_word_embeddings=False), store_embed_out=False)
    with pytest.raises(ValueError, match="shard size"):
        write_random_checkpoint(tmp_path, MICRO, shard_size="lots")
    with pytest.raises(ValueError, match="init_std must be > 0, got 0.0"):
        write_random_checkpoint(tmp_path, MICRO, init_std=0.0)


def test_existing_weights_need_overwrite(tmp_path):
    write_random_checkpoint(tmp_path, MICRO, shard_size="10KB")
    with pytest.raises(FileExistsError, match="already holds weights"):
        write_random_checkpoint(tmp_path, MICRO)
    write_random_checkpoint(tmp_path, MICRO, overwrite=True)  # old shards and index removed, not mixed in
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert set(load_weights(tmp_path, MICRO, dtype=torch.float32)) == set(expected_shapes(MICRO))


# --- the init-random command -------------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    return main(["init-random", *argv])


@pytest.mark.parametrize(("flags", "expect_embed_out", "tie_key"), [([], True, None), (["--tied"], False, None),
                                                                     (["--untied"], True, False)])
def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys, flags, expect_embed_out, tie_key):
    out_dir = tmp_path / "ckpt"
    assert run_cli([str(out_dir), "--preset", "tiny", "--format", "bin", "--shard-size", "4MB", "--dtype", "bfloat16",
                    "--seed", "3", *flags]) == 0
    assert f"wrote {out_dir}: preset tiny" in capsys.readouterr().out
    assert (out_dir / "pytorch_model.bin.index.json").is_file()
    assert json.loads((out_dir / "config.json").read_text()).get("tie_word_embeddings") == tie_key
    state_dict = load_weights(out_dir, load_config(out_dir), dtype=torch.float32)
    assert (state_dict[EMBED_OUT] is state_dict[EMBED_IN]) == (not expect_embed_out)
    assert (EMBED_OUT in stored_tensors(out_dir)) == expect_embed_out
    assert stored_tensors(out_dir)[EMBED_IN].dtype == torch.bfloat16


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path), "--preset", "huge"])
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path), "--preset", "tiny", "--shard-size", "big"])
    assert "is not a size such as 2GB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path), "--preset", "tiny", "--tied", "--untied"])
    assert "hayabusa init-random: error: argument --untied: not allowed with argument --tied" in capsys.readouterr().err
    assert run_cli([str(tmp_path), "--preset", "tiny", "--quiet"]) == 0
    assert run_cli([str(tmp_path), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hayabusa init-random: error: ") and "already holds weights" in err
    assert run_cli([str(tmp_path), "--preset", "tiny", "--overwrite"]) == 0


def test_random_preset_is_written_once_into_the_cache(tmp_path, monkeypatch):
    from hayabusa.engine.loading.random_models import random_preset_dir

    monkeypatch.setenv("HAYABUSA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of 2\.7b, small, tiny"):
        random_preset_dir("huge")
    model_dir = random_preset_dir("tiny", dtype=torch.float32, seed=1)
    assert model_dir.parent == tmp_path / "hayabusa" and load_config(model_dir) == PRESETS["tiny"]
    written = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert random_preset_dir("tiny", dtype=torch.float32, seed=1) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == written
    assert sorted(p.name for p in tmp_path.joinpath("hayabusa").iterdir()) == [model_dir.name]  # no staging left
