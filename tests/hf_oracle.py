"""Random tiny GPT-NeoX-Japanese models built by transformers (the oracle) and their weights for hayabusa."""

import torch
from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

from hayabusa.engine.loading.config import ModelConfig


def random_hf_model(seed: int, *, hidden: int = 64, heads: int = 4, layers: int = 3, vocab: int = 101,
                    rotary_pct: float = 1.0, tied: bool = True, max_positions: int = 128
                    ) -> tuple[GPTNeoXJapaneseForCausalLM, ModelConfig, dict[str, torch.Tensor]]:
    """A transformers model with every weight random (LayerNorms and the last dense_bias too), fp32, eval."""
    torch.manual_seed(seed)
    hf_config = GPTNeoXJapaneseConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
        intermediate_multiple_size=4, max_position_embeddings=max_positions, rotary_pct=rotary_pct,
        rotary_emb_base=10000, tie_word_embeddings=tied, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
    )
    model = GPTNeoXJapaneseForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name == "embed_out.weight" and tied:
                continue  # shares embed_in's storage
            if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.1 * torch.randn_like(tensor))
    config = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=max_positions, partial_rotary_factor=rotary_pct, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, tie_word_embeddings=tied,
    )
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if tied:
        state_dict["embed_out.weight"] = state_dict["gpt_neox_japanese.embed_in.weight"]
    return model, config, state_dict
