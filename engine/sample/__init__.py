"""Choosing tokens from logits: the sampling math (ops: penalties, processors, warpers, the Gumbel-max draw) and the
seeds that key its noise (seeds), transformers' and OpenAI's logits processors as batched tensor functions
(logits_processors) with their inputs built from host token lists (processors_from_lists), the per-slot sampler on
the device (sampler), log-probabilities of tokens (logprobs), and structured outputs' grammars on llguidance
(grammars, with the vocabulary as it sees it: grammar_vocab)."""
