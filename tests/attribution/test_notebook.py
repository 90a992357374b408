"""``notebooks/03_modality_attributions.ipynb`` runs top to bottom on a small corpus (its committed
outputs are checked by ``tests/evaluation/test_notebooks.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "03_modality_attributions.ipynb"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CLINICAL_MOE_NB_SMALL", "1")
    monkeypatch.setenv("CLINICAL_MOE_NB_DIR", str(tmp_path / "nb"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CLINICAL_MOE_RUN_ID", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)  # in memory; the committed file is not written
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None  # check this run's outputs only
    NotebookClient(  # started from notebooks/, Jupyter's default working folder
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    text = "".join(
        out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )
    assert "stays, modalities" in text and "test AUROC" in text
    assert "SMALL MODE" in text  # the small run says its numbers are meaningless
    images = sum(
        "image/png" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
    )
    assert images >= 4  # importance, patterns, routing, faithfulness / stay plots
    assert (tmp_path / "nb" / "downloads").is_dir()
