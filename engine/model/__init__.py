"""GPT-NeoX-Japanese over a paged KV cache on the kernels or their plain-PyTorch twins (paged_model), and what it
launches on a GPU, counted on any machine (launches)."""
