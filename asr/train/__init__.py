"""Recovery training: objectives, DeepSpeed engine, the loop, checkpoints, tracking."""
