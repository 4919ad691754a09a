"""What both methods share: configuration (YAML + validated hparams), durable file writing, distributed training."""
