"""AutoSpace in JAX/Flax: learn the NAS search space, search in it, train the result."""

from autospace_jax.runtime import platforms

platforms.skip_absent_tpu()  # Before anything asks JAX for devices.

from autospace_jax.final.export import load_model  # noqa: E402
from autospace_jax.nn.cells import Cell, Network  # noqa: E402
from autospace_jax.space.arch import Arch, Skeleton, load_arch, save_arch  # noqa: E402
from autospace_jax.space.genome import Genome  # noqa: E402

__all__ = ["Arch", "Cell", "Genome", "Network", "Skeleton", "load_arch", "load_model", "save_arch"]
