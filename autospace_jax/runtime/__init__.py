"""What every stage runs on: errors, run-folder files, processes and devices, checkpoints,
failure guards, progress, writers, preemption, the run-folder lease, host memory.

The bottom layer: imports nothing else of autospace_jax.
"""
