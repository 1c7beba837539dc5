"""Training: stages, evaluation, checkpoints."""
