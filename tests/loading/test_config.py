"""ModelConfig reads config.json like transformers does (both rotary spellings, same defaults) and rejects bad keys."""

import json

import pytest
from transformers import GPTNeoXJapaneseConfig

from hayabusa.engine.loading.config import PRESETS, ConfigError, ModelConfig, load_config, preset

# abeja/gpt-neox-japanese-2.7b's config.json spelling: rotary_* keys, bos = eos = 31999, no tie key.
ABEJA_STYLE = {
    "architectures": ["GPTNeoXJapaneseForCausalLM"], "model_type": "gpt_neox_japanese", "bos_token_id": 31999,
    "eos_token_id": 31999, "hidden_act": "gelu", "hidden_size": 2560, "intermediate_multiple_size": 4,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "num_attention_heads": 32, "num_hidden_layers": 32,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}

SPELLINGS = {
    "abeja": ABEJA_STYLE,
    "empty": {},
    "rotary_keys": {"rotary_pct": 0.5, "rotary_emb_base": 500},
    "rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 123.0,
                                            "partial_rotary_factor": 0.25}},
    "rope_parameters_win": {"rope_parameters": {"rope_type": "default", "rope_theta": 3.0}, "rotary_emb_base": 500,
                            "rotary_pct": 0.5},
    "rope_scaling_legacy": {"rope_scaling": {"type": "default", "rope_theta": 7.0}},
    "top_level_rope_theta_ignored": {"rope_theta": 777.0, "partial_rotary_factor": 0.5},
    "untied": {"tie_word_embeddings": False, "bos_token_id": 3, "eos_token_id": 4},
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_config_matches_transformers(name):
    raw = SPELLINGS[name]
    ours = ModelConfig.from_dict(json.loads(json.dumps(raw)))
    theirs = GPTNeoXJapaneseConfig.from_dict({"model_type": "gpt_neox_japanese", **json.loads(json.dumps(raw))})
    assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"]
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings is theirs.tie_word_embeddings
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_multiple_size",
                "max_position_embeddings", "layer_norm_eps", "hidden_act"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_abeja_config_values():
    config = ModelConfig.from_dict(ABEJA_STYLE)
    assert config == PRESETS["2.7b"]
    assert (config.head_dim, config.intermediate_size, config.rotary_dims) == (80, 10240, 80)
    assert config.tie_word_embeddings is True  # absent key -> transformers' default
    assert config.bos_token_id == config.eos_token_id == 31999


def test_defaults_match_transformers():
    ours, theirs = ModelConfig(), GPTNeoXJapaneseConfig()
    assert (ours.bos_token_id, ours.eos_token_id, ours.tie_word_embeddings) == (31996, 31999, True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.tie_word_embeddings) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.tie_word_embeddings)
    assert ours.layer_norm_eps == theirs.layer_norm_eps and ours.rope_theta == theirs.rope_parameters["rope_theta"]


def test_eos_list_takes_first():
    assert ModelConfig.from_dict({"eos_token_id": [5, 6]}).eos_token_id == 5


def test_to_hf_dict_round_trips():
    for config in [*PRESETS.values(), ModelConfig(hidden_size=96, num_attention_heads=3, partial_rotary_factor=0.5,
                                                  rope_theta=500.0, tie_word_embeddings=False)]:
        hf = config.to_hf_dict()
        assert "rotary_pct" in hf and "rotary_emb_base" in hf
        assert ModelConfig.from_dict(json.loads(json.dumps(hf))) == config


def test_presets_shapes():
    assert {name: (c.hidden_size, c.num_hidden_layers, c.head_dim) for name, c in PRESETS.items()} == {
        "2.7b": (2560, 32, 80), "small": (640, 4, 80), "tiny": (160, 2, 80)}
    assert preset("tiny") is PRESETS["tiny"]
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


REJECTS = [
    ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": 2.5}, "num_attention_heads"),
    ({"intermediate_multiple_size": True}, "intermediate_multiple_size"),
    ({"max_position_embeddings": "2048"}, "max_position_embeddings"),
    ({"rotary_pct": -0.25}, "rotary_pct"),
    ({"rotary_pct": float("nan")}, "rotary_pct"),
    ({"rotary_pct": float("inf")}, "rotary_pct"),
    ({"rotary_pct": 1.5}, "rotary_pct"),
    ({"rotary_pct": "half"}, "rotary_pct"),
    ({"rotary_emb_base": -1}, "rotary_emb_base"),
    ({"rotary_emb_base": None}, "rotary_emb_base"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"bos_token_id": 32000}, "bos_token_id"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": "31999"}, "eos_token_id"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
]


@pytest.mark.parametrize(("raw", "key"), REJECTS, ids=[f"{key}-{i}" for i, (_, key) in enumerate(REJECTS)])
def test_rejects_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(raw)


def test_odd_rotary_dims_rejected():
    # head_dim 82 * 0.25 = 20.5 -> 20 (even, fine); head_dim 90 * 0.1 = 9 (odd, the rotate-half split breaks).
    assert ModelConfig(hidden_size=164, num_attention_heads=2, partial_rotary_factor=0.25).rotary_dims == 20
    with pytest.raises(ConfigError, match="rotary dims .* = 9 must be even"):
        ModelConfig(hidden_size=180, num_attention_heads=2, partial_rotary_factor=0.1)


def test_rotary_dims_follow_transformers_rounding():
    """Rotary dims are int(head_dim * factor), as transformers computes them: a factor of 0 or one that rounds down
    to 0 means no rotary; a factor a hair above 1 still rotates the whole head; one that needs more dims fails."""
    assert ModelConfig(hidden_size=64, num_attention_heads=8, partial_rotary_factor=0.0).rotary_dims == 0
    assert ModelConfig(hidden_size=64, num_attention_heads=8, partial_rotary_factor=0.1).rotary_dims == 0
    assert ModelConfig(hidden_size=64, num_attention_heads=8, partial_rotary_factor=1.0000001).rotary_dims == 8
    assert ModelConfig(hidden_size=44, num_attention_heads=2, partial_rotary_factor=14 / 22).rotary_dims == 14
    with pytest.raises(ConfigError, match="= 15 must be even"):  # int(22 * 15.5 / 22) = 15
        ModelConfig(hidden_size=22, num_attention_heads=1, partial_rotary_factor=15.5 / 22)
    with pytest.raises(ConfigError, match=r"rotary dims = head_dim 8 .* = 9 exceed head_dim 8"):
        ModelConfig(hidden_size=64, num_attention_heads=8, partial_rotary_factor=1.125)


def test_absent_keys_are_recorded_and_named_when_their_default_breaks_the_config():
    raw = PRESETS["tiny"].to_hf_dict()
    assert ModelConfig.from_dict(raw).defaulted_keys == ()
    del raw["num_attention_heads"]  # tiny has 2 heads of 80; the default 32 makes head_dim 5, which cannot rotate
    with pytest.raises(ConfigError) as config_error:
        ModelConfig.from_dict(raw)
    message = str(config_error.value)
    assert "rotary dims = head_dim 5 ('hidden_size' 160 / 'num_attention_heads' 32)" in message
    assert "config.json has no 'num_attention_heads', so transformers' default for GPT-NeoX-Japanese 2.7B " \
           "(num_attention_heads = 32) was used" in message
    abeja = ModelConfig.from_dict(ABEJA_STYLE)
    assert abeja.defaulted_keys == ("tie_word_embeddings",) and abeja == PRESETS["2.7b"]
    assert "defaulted_keys" not in abeja.to_hf_dict() and "defaulted_keys" not in repr(abeja)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.json: config key 'hidden_act'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ABEJA_STYLE), encoding="utf-8")
    assert load_config(tmp_path) == PRESETS["2.7b"]
