"""The supernet: its model and fitness logits, binary gates, the trainer and its step
programs (per-cell pieces or one fused program), their precompilation, the schedules."""
