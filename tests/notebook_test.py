"""notebooks/autospace_colab.ipynb runs top to bottom (its tiny digits setting) and shows its plots.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``), from a
kernel spec written into the test's own folder: whatever ``python3`` kernels the
machine has registered elsewhere are never used.
"""

import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "autospace_colab.ipynb")


def _kernel_manager(folder) -> KernelManager:
    spec_dir = folder / "kernels" / "this-python"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "this python", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


@pytest.mark.long
def test_notebook_runs_and_shows_its_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSPACE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("AUTOSPACE_REPO", ROOT)
    monkeypatch.setenv("XLA_FLAGS", runner.FAST_COMPILE)  # One CPU device, not conftest's 8.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The session's compilation cache (conftest), read by JAX from its environment: the
    # notebook's tiny pipeline shares most programs with the other tests' tiny runs.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ[runner.CACHE_ENV])
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "the notebook is stored with outputs; clear them before committing"
    )
    km = _kernel_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(run_dir)}})
    try:
        client.execute()  # Raises CellExecutionError, with the cell and traceback, on any error.
    finally:  # nbclient shuts down only kernels it started itself; this one is ours.
        if km.has_kernel:
            km.shutdown_kernel(now=True)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # alpha_history.png, learned_cells.png and the predictions' figure.
    assert len(images) >= 3, [o.output_type for o in outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "chosen network:" in text and "test top-1" in text
    assert (run_dir / "runs" / "digits_notebook" / "train" / "summary.json").is_file()
