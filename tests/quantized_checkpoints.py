"""Quantized checkpoints for tests: the committed llm-compressor fixture (tests/fixtures/make_llmc_rtn.py wrote it),
a one-layer model of its shape (every scheme fits: hidden 128, MLP 256), and reading a directory's tensors."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hayabusa.engine.loading.checkpoint_writer import write_random_checkpoint
from hayabusa.engine.loading.config import ModelConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llmc_rtn"
LLMC_DIR = FIXTURE / "llm-compressor"  # llm-compressor 0.14's RTN of SOURCE_DIR, one config group per scheme
SOURCE_DIR = FIXTURE / "source"  # fp16, untied
# The fixture's config groups: scheme -> targets (a regular expression each; the class "Linear" takes the rest)...
FIXTURE_TARGETS = {"W4A16": ["re:.*query_key_value$"], "W8A16": ["re:.*attention\\.dense$"],
                   "W8A16_CHANNEL": ["Linear"], "W4A16_ASYM": ["re:.*dense_4h_to_h$"]}
# ... and so module -> scheme
LAYER = "gpt_neox_japanese.layers.0."
FIXTURE_SCHEMES = {LAYER + "attention.query_key_value": "W4A16", LAYER + "attention.dense": "W8A16",
                   LAYER + "mlp.dense_4h_to_h": "W4A16_ASYM", LAYER + "mlp.dense_h_to_4h": "W8A16_CHANNEL",
                   "embed_out": "W8A16_CHANNEL"}
# Shapes where every scheme fits (K a multiple of 128), two layers, a vocabulary the tokenizer's ids fall outside
# of: tests feed token ids.
GROUPED = ModelConfig(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_multiple_size=2, max_position_embeddings=64, bos_token_id=99, eos_token_id=100,
                      tie_word_embeddings=False)


def grouped_checkpoint(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A random GROUPED checkpoint whose weights spread like a trained model's (std 0.1: attention and MLP weigh in
    the logits as much as the embeddings)."""
    return write_random_checkpoint(path, GROUPED, dtype=dtype, seed=seed, init_std=0.1)


def stored_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}


def quantization_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]
