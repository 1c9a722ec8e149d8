"""hayabusa.bench: hayabusa against transformers on the same weights, prompts and token counts (`hayabusa bench`)."""
