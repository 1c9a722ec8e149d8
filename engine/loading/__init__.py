"""From a `--model` name to a config and weights on the device: what the name means (model_source: a directory,
a Hub repo id, a random preset), fetching from the Hub (hub), config.json (config), the weight files and their
tensor names (weights, with pickle_scan for .bin files and host_arena for the host copy), and writing random
checkpoints of the real layout (checkpoint_writer, random_models)."""
