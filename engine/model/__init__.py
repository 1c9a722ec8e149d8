"""GPT-NeoX-Japanese over a paged KV cache (paged_model), on either op set (op_sets: the Triton kernels or their
plain-PyTorch twins, whose linear layers on quantized weights live in torch_linears), and what it launches on a GPU,
counted on any machine (launches)."""
