"""From a `--model` name to a config and weights on the device: what the name means (model_source: a directory,
a Hub repo id, a random preset), fetching from the Hub (hub), config.json (config), the checkpoint's tensor names
(tensor_names), the weight files (weights, with pickle_scan for .bin files and host_arena for the host copy),
quantized weights (quant_schemes: the schemes by name; compressed_tensors_config: a checkpoint's
quantization_config; quantized_tensors: its tensors as QuantizedWeights, or fp weights quantized while loading),
and writing checkpoints: random ones of the real layout (checkpoint_writer, random_models) and quantized copies
(quantize_checkpoint)."""
