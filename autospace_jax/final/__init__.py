"""``--mode=train``: the final network trained from scratch, and its export."""

from autospace_jax.final.train import run

__all__ = ["run"]
