"""Test session setup: 8 fake CPU devices, so sharding tests can build meshes of 1..8,
fast compiles, and one persistent compilation cache for the whole session.

XLA reads the flag when JAX first initialises its backends, so it must be set
before any test imports jax.
"""

import os
import sys

import pytest

# configs/*.py import `configs.default`: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.runner import CACHE_ENV, FAST_COMPILE  # noqa: E402

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One JAX compilation cache for every test, every xdist worker and every run a test
    starts (tests.runner passes it on): the same tiny configs recur across tests, their
    kills and resumes, and on CPU compiling is most of a tiny run's time. Loading a
    compiled program changes no result (the determinism tests compare across runs)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The session's folder, which every worker's basetemp is in.
    directory = str(root / "compilation_cache")
    os.environ[CACHE_ENV] = directory
    compilation_cache_lib.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield directory
