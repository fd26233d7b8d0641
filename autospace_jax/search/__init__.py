"""NAS inside a space (paper §3.3, §4, Eq. 6; DESIGN §6): ``--mode=search``.

The algorithms are the registry :data:`ALGORITHMS`, name -> :class:`Algorithm`:
``proxyless`` (gradient, ProxylessNAS-G), ``rl`` (REINFORCE, ProxylessNAS-RL) and
``spos`` (single-path one-shot + evolutionary search). Config checks and the
stage driver (``stage.py``) read the names and properties from it, so a fourth
algorithm is one module with a ``run`` plus one entry here.
"""

from autospace_jax.search.algorithms import ALGORITHMS, Algorithm
from autospace_jax.search.stage import run

__all__ = ["ALGORITHMS", "Algorithm", "run"]
