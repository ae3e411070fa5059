"""Training: the loop, checkpoints and device handling."""
