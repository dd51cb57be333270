"""The notebooks of notebooks/: each runs top to bottom, headless, on CPU (nbclient + an ipykernel of this Python),
and is kept with its outputs stripped, opening with the cell that installs the package on Colab.

Each notebook's own cells assert what it shows (the loss falls, the sharded model decodes what one device does);
the test adds a few checks of its printed output. The kernel runs with JAX_PLATFORMS=cpu, this checkout first on
PYTHONPATH, and TMPDIR in the test's tmp_path, so the notebooks' scratch folders go there.
"""

import json
import os
import pathlib
import resource
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# notebook -> strings its output must hold
EXPECTED = {
    "quickstart.ipynb": ["TINY preset with RANDOM weights", "text (compiled)", "image:", "audio:", "video:",
                         "traces per program"],
    "convert_and_shard.ipynb": ["8 devices", "wrote ", "mesh: {", "logits after the prompts"],
    "train_tiny.ipynb": ["-> step 24: loss", "model.safetensors"],
}


def test_the_notebooks_are_the_expected_ones():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kept_stripped_with_a_colab_setup_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: code cell {i} holds outputs"
        assert not cell.metadata.get("execution"), f"{name}: code cell {i} holds execution metadata"
    assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata"
    assert nb.metadata.get("accelerator") == "TPU", f"{name}: Colab should offer the TPU runtime"
    first = code[0].source
    for needle in ("google.colab", "pip", "MING_JAX_SRC", "jax[tpu]"):
        assert needle in first, f"{name}: the first code cell should install ming_jax on Colab ({needle!r})"
    assert "colab.research.google.com" in nb.cells[0].source, f"{name}: no Open in Colab link"


def _kernel(tmp_path) -> KernelManager:
    """A kernel of this very interpreter (not whatever `python` is first on PATH)."""
    spec_dir = tmp_path / "kernels" / "ming_jax_test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ming_jax test", "language": "python"}))
    return KernelManager(kernel_name="ming_jax_test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))


def _printed(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_runs_top_to_bottom_on_cpu(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(scratch), PYTHONPATH=os.pathsep.join(path))
    env["XLA_FLAGS"] = xla_env.flags()  # the suite's compile setting only; convert_and_shard adds its devices
    env.pop("MPLBACKEND", None)  # the kernel's inline backend: figures come back as image/png outputs
    env.pop("MING_CHECKPOINT", None)  # the quickstart's tiny-preset path
    km = _kernel(tmp_path)
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        client.execute(env=env)
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)  # a kernel manager we made is ours to stop
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    printed = _printed(nb)
    for needle in EXPECTED[name]:
        assert needle in printed, f"{name}: {needle!r} not in its output:\n{printed[-3000:]}"
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1 or name == "convert_and_shard.ipynb", f"{name}: no plot came out"
    print(f"{name}: {seconds:.1f} s ({cpu:.1f} s of kernel CPU time)")
