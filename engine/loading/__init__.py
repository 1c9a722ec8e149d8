"""From a `--model` name to a config and weights on the device: what the name means (model_source: a directory,
a Hub repo id, a random preset), fetching from the Hub (hub), config.json (config), the checkpoint's tensor names
(tensor_names), the weight files (weights, with pickle_scan for .bin files and host_arena for the host copy), and
writing random checkpoints of the real layout (checkpoint_writer, random_models)."""
