"""The core of mola: config, allocation, the MoLA layer, injection, model, checkpoints."""
