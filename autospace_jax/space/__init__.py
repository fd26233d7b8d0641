"""The search space as data: cell genomes, architectures, MAdds, the per-layer spaces.

Imports only :mod:`autospace_jax.runtime`.
"""
