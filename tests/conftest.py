"""Test session setup: 4 fake CPU devices (``runner.DEVICES``), so sharding tests can
build meshes of 1..4, fast compiles, and one persistent compilation cache for the
whole session.

XLA reads the flag when JAX first initialises its backends, so it must be set
before any test imports jax.
"""

import os
import sys

import pytest

# configs/*.py import `configs.default`: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import runner  # noqa: E402
from tests.runner import CACHE_ENV, DEVICES, FAST_COMPILE  # noqa: E402

os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_folder(tmp_path_factory) -> str:
    """The session's folder, which every xdist worker's base folder is in."""
    root = tmp_path_factory.getbasetemp()
    return str(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One JAX compilation cache for every test, every xdist worker and every run a test
    starts (tests.runner passes it on): the same tiny configs recur across tests, their
    kills and resumes, and on CPU compiling is most of a tiny run's time. Loading a
    compiled program changes no result (the determinism tests compare across runs)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib

    directory = os.path.join(_session_folder(tmp_path_factory), "compilation_cache")
    os.environ[CACHE_ENV] = directory
    compilation_cache_lib.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield directory


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, compilation_cache):
    """One uninterrupted run of ``runner.TINY_PIPELINE`` for the whole session, shared
    by every test that compares with it or reads its log, in whichever worker it runs:
    the pipeline's kill and SIGTERM tests, evolve's constraints and accounting, the
    README sample. Tests read it and never write into it."""
    folder = os.path.join(_session_folder(tmp_path_factory), "tiny_pipeline")
    return runner.shared_run(folder, *runner.TINY_PIPELINE)


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` (20 s or more each here) run first: xdist then hands the
    short ones to whichever process is free, so both end together instead of one
    running a long test alone at the end (the order changes no result)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
