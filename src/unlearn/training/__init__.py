"""Training: the one loop, its losses, optimizers and schedules, the frozen-activation cache,
and resumable checkpoints with the stop signals that trigger them."""
