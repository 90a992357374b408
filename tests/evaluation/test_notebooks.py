"""The notebooks run top to bottom in their small setting (``CLINICAL_MOE_NB_SMALL=1``)."""

from __future__ import annotations

import pytest

from .conftest import REPO

NOTEBOOKS = ("01_quickstart.ipynb", "02_missingness.ipynb")


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
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit notebooks with outputs cleared"
    )
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
