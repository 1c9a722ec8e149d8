"""Choosing tokens from logits: the per-slot device sampler (sampler), transformers' and OpenAI's logits processors
as batched tensor functions (logits_processors), and log-probabilities of tokens (logprobs)."""
