"""What both methods share: configuration (YAML + validated hparams), device resolution, durable file writing,
distributed training."""
