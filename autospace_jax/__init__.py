"""AutoSpace in JAX/Flax: learn the NAS search space, search in it, train the result."""

from autospace_jax.arch import Arch, Skeleton, load_arch, save_arch
from autospace_jax.cells import Cell, Network
from autospace_jax.export import load_model
from autospace_jax.genome import Genome

__all__ = ["Arch", "Cell", "Genome", "Network", "Skeleton", "load_arch", "load_model", "save_arch"]
