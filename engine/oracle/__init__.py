"""The oracle the fast path is checked against, on plain PyTorch: the reference model (reference_model: transformers'
math on a contiguous KV cache), its generation loop (reference_generate, with the list-based sampler of
reference_sampler) and beam search (reference_beams), and `hayabusa verify` (verify), which compares the kernel path
with it on the same weights and reports a quantized model's drift from the fp one (quantization_drift). Nothing here
imports the paged engine's model, worker or scheduler, except `verify`, whose job is to run both."""
