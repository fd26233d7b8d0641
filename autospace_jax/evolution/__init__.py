"""``--mode=evolve``: the differentiable evolutionary algorithm that learns the space."""

from autospace_jax.evolution.stage import run

__all__ = ["run"]
