"""The notebooks run top to bottom in their small setting (``CLINICAL_MOE_NB_SMALL=1``), and are
committed executed at their medium size with outputs that match their current code."""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import REPO

NOTEBOOKS = ("01_quickstart.ipynb", "02_missingness.ipynb")
ALL_NOTEBOOKS = (*NOTEBOOKS, "03_modality_attributions.ipynb")


def _execute_module():
    spec = importlib.util.spec_from_file_location("_nb_execute", REPO / "notebooks" / "_execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_committed_notebook_is_executed_and_current(name):
    """Fast (no execution): outputs with figures, from the current code cells and generator."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    rerun = "re-execute it: OMP_NUM_THREADS=1 python notebooks/_execute.py"
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert code and all(c.execution_count for c in code), f"{name} is not executed; {rerun}"
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{name}: error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} has no figure; {rerun}"
    stored = nb.metadata.get("clinical_moe", {}).get("source_hash")
    assert stored == _execute_module().source_hash(nb), (
        f"{name}: code cells or notebooks/_make_notebooks.py changed since the committed outputs "
        f"were made; {rerun}"
    )
    printed = "".join(o.get("text", "") for o in outputs)
    assert "SMALL MODE" not in printed  # committed at the medium size, not the small one
    assert not any("execution" in c.metadata for c in code)  # no volatile timestamps


@pytest.fixture(scope="module")
def nb_env(tmp_path_factory):
    """Small sizes, a private work dir and MLflow store; shared so notebook 2 reuses the corpus."""
    work = tmp_path_factory.mktemp("notebooks")
    return {
        "CLINICAL_MOE_NB_SMALL": "1",
        "CLINICAL_MOE_NB_DIR": str(work),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, nb_env, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from pathlib import Path

    for key, value in nb_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    # read into memory and run there: the committed file is never written
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None  # check this run's outputs only
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},  # Jupyter's default folder
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "SMALL MODE" in printed  # the small run says its numbers are meaningless
    work = Path(nb_env["CLINICAL_MOE_NB_DIR"])
    out = work / "eval" / ("quickstart" if name.startswith("01") else "missingness")
    for f in ("report.html", "grid.csv", "auroc_vs_rate.png"):
        assert (out / f).is_file(), f
