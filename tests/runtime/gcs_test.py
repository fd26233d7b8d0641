"""gs:// run folders: the GCS filesystem is installed, and the run-folder layer works over one.

The fake is fsspec's in-memory filesystem registered for the ``gcs`` protocol, the
one etils.epath asks fsspec for on ``gs://`` paths (without TensorFlow): the same
code path as a real bucket, minus the network.
"""

import fsspec
import pytest
from etils import epath
from fsspec.implementations import memory

from autospace_jax.runtime import errors, files, lease


def test_the_gcs_filesystem_is_installed():
    assert fsspec.get_filesystem_class("gcs").__module__.startswith("gcsfs")


class _FakeGcs(memory.MemoryFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del finalize_on_close  # gcsfs's option, which epath passes.
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs():
    real = fsspec.get_filesystem_class("gcs")
    fsspec.register_implementation("gcs", _FakeGcs, clobber=True)
    get = epath.backend.fsspec_backend._get_filesystem
    get.cache_clear()
    yield _FakeGcs()
    fsspec.register_implementation("gcs", real, clobber=True)
    get.cache_clear()
    _FakeGcs.store.clear()
    _FakeGcs.pseudo_dirs.clear()
    _FakeGcs.pseudo_dirs.append("")


def test_run_folder_files_on_a_gs_bucket(fake_gcs):
    run = "gs://bucket/runs/r1"
    files.check_run_folder(run)
    files.write_json(f"{run}/search/arch.json", {"layers": [1, 2]})
    assert fake_gcs.exists(f"{run}/search/arch.json")
    assert files.read_json(f"{run}/search/arch.json") == {"layers": [1, 2]}
    assert [p for p in _FakeGcs.store if ".tmp" in p] == []  # Renamed into place.
    files.write_summary(f"{run}/train/summary.json", {"steps": 3})
    assert files.finished(f"{run}/train/summary.json", lambda s: s["steps"] == 3) == {"steps": 3}
    fake_gcs.pipe(f"{run}/evolve/summary.json", b"{not json")
    with pytest.raises(errors.RunFolderError, match="not valid JSON"):
        files.finished(f"{run}/evolve/summary.json", lambda s: True)


def test_a_run_folder_lease_on_a_gs_bucket(fake_gcs):
    """The lease reads, writes and removes through epath like every run-folder file."""
    run = "gs://bucket/runs/r2"
    with lease.held(run, "train", takeover=False):
        assert fake_gcs.exists(f"{run}/{lease.FILENAME}")
        with pytest.raises(errors.RunFolderError, match="in use by another run"):
            with lease.held(run, "search", takeover=False):
                pass
    assert not fake_gcs.exists(f"{run}/{lease.FILENAME}")
