"""GPT-NeoX-Japanese over a paged KV cache (paged_model), on either op set (op_sets: the Triton kernels or their
plain-PyTorch twins, with the CPU's packed linear kernels of kernels/cpu_linear.py), and what it launches on a GPU,
counted on any machine (launches)."""
