"""What both methods share: configuration (YAML + validated hparams), device resolution, durable file writing,
the checkpoint format (manifest, hashes, base-model identity, trainer state), distributed training."""
