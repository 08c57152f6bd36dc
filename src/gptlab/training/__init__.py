"""Training: settings, the loop and its step, optimizer and precision, checkpoints, distributed runs, run setup."""
