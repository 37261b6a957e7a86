"""Training loop, checkpoints and generation: nothing here knows about methods or tasks."""
