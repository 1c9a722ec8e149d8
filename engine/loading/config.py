"""Model configuration: read `config.json` in either key spelling, validate, and name the presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Model dtypes by name, as the CLI and config files spell them; DTYPES maps them to torch dtypes (see __getattr__).
DTYPE_NAMES = ("float32", "float16", "bfloat16")

SUPPORTED_ACTIVATIONS = ("gelu",)  # transformers' "gelu" is the exact erf form
# config.json keys read as they are spelled; an absent one takes transformers' default (the 2.7B model's value).
PLAIN_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_multiple_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act", "bos_token_id", "tie_word_embeddings")


class ConfigError(ValueError):
    """A config.json value the model cannot be built from; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_multiple_size: int = 4
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    bos_token_id: int | None = 31996
    eos_token_id: int | None = 31999
    tie_word_embeddings: bool = True
    # PLAIN_KEYS that config.json lacked, so they hold the defaults above; named when the weights disagree.
    defaulted_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Types first, so the range checks below never hit a TypeError (config.json may hold anything).
        for key in ("partial_rotary_factor", "rope_theta", "layer_norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            value = self.tie_word_embeddings
            raise ConfigError(f"config key 'tie_word_embeddings' must be true or false, got {value!r}")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"config key '{key}' must be an integer token id or null, got {value!r}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_multiple_size", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config key 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        # transformers takes any factor whose rotary dims int(head_dim * factor) fit the head: 0 (no rotary) too.
        if not 0.0 <= self.partial_rotary_factor < float("inf"):
            raise ConfigError(
                f"config key 'rotary_pct' / 'partial_rotary_factor' must be a finite number >= 0, "
                f"got {self.partial_rotary_factor!r}"
            )
        if self.rotary_dims > self.head_dim:
            raise ConfigError(
                f"rotary dims = head_dim {self.head_dim} ('hidden_size' {self.hidden_size} / 'num_attention_heads' "
                f"{self.num_attention_heads}) x 'rotary_pct' / 'partial_rotary_factor' {self.partial_rotary_factor} = "
                f"{self.rotary_dims} exceed head_dim {self.head_dim}"
            )
        if self.rotary_dims % 2:  # transformers fails on these, or (1 rotary dim) silently widens the head to 2
            raise ConfigError(
                f"rotary dims = head_dim {self.head_dim} ('hidden_size' {self.hidden_size} / 'num_attention_heads' "
                f"{self.num_attention_heads}) x 'rotary_pct' / 'partial_rotary_factor' {self.partial_rotary_factor} = "
                f"{self.rotary_dims} must be even (rotate-half pairs dims)"
            )
        if not self.rope_theta > 0:
            raise ConfigError(f"config key 'rotary_emb_base' / 'rope_theta' must be > 0, got {self.rope_theta!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"config key 'layer_norm_eps' must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config key 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"config key '{key}' = {value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.intermediate_multiple_size

    @property
    def rotary_dims(self) -> int:
        # transformers: int(head_size * partial_rotary_factor)
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a transformers config dict; accepts `rotary_pct`/`rotary_emb_base` and `rope_parameters`."""
        model_type = raw.get("model_type", "gpt_neox_japanese")
        if model_type != "gpt_neox_japanese":
            raise ConfigError(f"config key 'model_type' is {model_type!r}; hayabusa runs 'gpt_neox_japanese'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config key 'rope_parameters' must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config key 'rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported")
        eos = raw.get("eos_token_id", cls.eos_token_id)
        if isinstance(eos, list):
            if not eos:
                raise ConfigError("config key 'eos_token_id' is an empty list")
            eos = eos[0]
        fields: dict[str, Any] = {
            "partial_rotary_factor": rope.get("partial_rotary_factor", raw.get("rotary_pct", 1.0)),
            # transformers reads only rope_parameters and abeja's rotary_* keys; a top-level `rope_theta` or
            # `partial_rotary_factor` is ignored there, so it is ignored here too.
            "rope_theta": rope.get("rope_theta", raw.get("rotary_emb_base", 10000.0)),
            "eos_token_id": eos,
        }
        fields |= {key: raw[key] for key in PLAIN_KEYS if key in raw}
        for key, spelling in (("partial_rotary_factor", "rotary_pct"), ("rope_theta", "rotary_emb_base")):
            value = fields[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"config key '{spelling}' / 'rope_parameters.{key}' must be a number, got {value!r}")
            fields[key] = float(value)
        defaulted = tuple(key for key in PLAIN_KEYS if key not in raw)
        try:
            return cls(**fields, defaulted_keys=defaulted)
        except ConfigError as err:  # e.g. a default head count that does not divide the stored hidden size
            note = describe_defaults(defaulted, [key for key in defaulted if f"'{key}'" in str(err)])
            raise ConfigError(f"{err}{'; ' + note if note else ''}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this model, with abeja's key spelling for rotary."""
        fields = asdict(self)
        del fields["defaulted_keys"]
        fields["rotary_pct"] = fields.pop("partial_rotary_factor")
        fields["rotary_emb_base"] = fields.pop("rope_theta")
        return {"architectures": ["GPTNeoXJapaneseForCausalLM"], "model_type": "gpt_neox_japanese",
                "attention_dropout": 0.1, "hidden_dropout": 0.0, "initializer_range": 0.02,
                "use_cache": True, **fields}

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        return replace(self, **overrides)


def describe_defaults(defaulted_keys: tuple[str, ...], keys: list[str]) -> str:
    """"config.json has no 'hidden_size': the default 2560 ... was used" for those of `keys` that were defaulted."""
    absent = [key for key in keys if key in defaulted_keys]
    if not absent:
        return ""
    defaults = ModelConfig()
    values = ", ".join(f"{key} = {getattr(defaults, key)!r}" for key in absent)
    names = ", ".join(f"'{key}'" for key in absent)
    return (f"config.json has no {names}, so transformers' default{'s' if len(absent) > 1 else ''} for "
            f"GPT-NeoX-Japanese 2.7B ({values}) {'were' if len(absent) > 1 else 'was'} used")


def load_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (its `config.json`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory")
    return ModelConfig.from_json(model_dir / "config.json")


# abeja/gpt-neox-japanese-2.7b's own config.json has no tie key and bos = eos = 31999.
PRESETS: dict[str, ModelConfig] = {
    "2.7b": ModelConfig(bos_token_id=31999, eos_token_id=31999),
    "small": ModelConfig(hidden_size=640, num_hidden_layers=4, num_attention_heads=8,
                         bos_token_id=31999, eos_token_id=31999),
    "tiny": ModelConfig(hidden_size=160, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=512, bos_token_id=31999, eos_token_id=31999),
}


def __getattr__(name: str) -> Any:
    """DTYPES ({name: torch.dtype}) imports torch on first use: the CLI's parsers read this module (the presets, the
    dtype names) and `hayabusa --help` must not wait for torch."""
    if name != "DTYPES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes = {dtype_name: getattr(torch, dtype_name) for dtype_name in DTYPE_NAMES}
    globals()["DTYPES"] = dtypes  # later reads find it without calling here
    return dtypes


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
