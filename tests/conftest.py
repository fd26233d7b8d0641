"""Test session setup: 8 fake CPU devices, so sharding tests can build meshes of 1..8.

XLA reads the flag when JAX first initialises its backends, so it must be set
before any test imports jax.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# configs/*.py import `configs.default`: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
