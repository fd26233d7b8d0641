"""Per-cell latency: the lookup table search reads, the timer evolve's bound uses, and
``--mode=latency``."""

from autospace_jax.latency.stage import run

__all__ = ["run"]
