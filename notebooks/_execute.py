"""Execute the notebooks in place at their medium size and keep the outputs (figures included).

Run from anywhere: ``OMP_NUM_THREADS=1 python notebooks/_execute.py [names...] [--clean]``.

- 01 and 02 are regenerated from ``_make_notebooks.py`` first (03 is edited by hand);
- each notebook runs with nbclient from ``notebooks/`` (Jupyter's default working folder), without
  ``CLINICAL_MOE_NB_SMALL``, so in its medium setting (1,500 patients, 64-96 px radiographs);
- corpus, cache, checkpoints and the MLflow store go under ``runs/notebooks/`` (gitignored;
  ``--clean`` deletes it first, otherwise corpus and cache are reused);
- volatile metadata (execution timestamps) is stripped, and ``metadata.clinical_moe.source_hash``
  records :func:`source_hash`, which ``tests/evaluation/test_notebooks.py`` recomputes: editing a
  code cell (or the generator) without re-executing fails the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = REPO / "runs" / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_missingness.ipynb", "03_modality_attributions.ipynb")
GENERATED = NOTEBOOKS[:2]
# Unset in the kernel: the small mode, a chosen run or store would not give the committed outputs.
UNSET = (
    "CLINICAL_MOE_NB_SMALL",
    "CLINICAL_MOE_NB_DIR",
    "CLINICAL_MOE_RUN_ID",
    "CLINICAL_MOE_STAY_ID",
    "MLFLOW_TRACKING_URI",
)


def source_hash(nb) -> str:
    """sha256 over the notebook's code cells (in order) and ``_make_notebooks.py``."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode())
            h.update(b"\0")
    h.update((HERE / "_make_notebooks.py").read_bytes())
    return h.hexdigest()


def strip_volatile(nb) -> None:
    """Drop execution timestamps and other per-run metadata so a re-run diffs only on content."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:  # stderr noise: the ipywidgets hint and MLflow's store set-up lines
        if cell.cell_type == "code":
            cell.outputs = [o for o in map(_drop_noise, cell.outputs) if o is not None]
    nb.metadata.get("language_info", {}).pop("version", None)


NOISE = (
    "TqdmWarning: IProgress not found",
    "from .autonotebook import tqdm",
    "INFO mlflow.store.db.utils",
)


def _drop_noise(output):
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return output
    lines = [
        line
        for line in output.text.splitlines(keepends=True)
        if line.strip() and not any(n in line for n in NOISE)
    ]
    if not lines:
        return None
    output.text = "".join(lines)
    return output


def execute(name: str, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient

    path = HERE / name
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        raise SystemExit(f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    strip_volatile(nb)
    nb.metadata.setdefault("clinical_moe", {})["source_hash"] = source_hash(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all three)")
    parser.add_argument("--clean", action="store_true", help="delete runs/notebooks first")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell timeout (s)")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.names or any(n.startswith(a) for a in args.names)]
    for key in UNSET:
        os.environ.pop(key, None)  # the kernel inherits this process's environment
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    if args.clean and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import _make_notebooks
    import nbformat

    builders = {GENERATED[0]: _make_notebooks.quickstart, GENERATED[1]: _make_notebooks.missingness}
    for name in names:
        if name in builders:  # 01 and 02 from their source, outputs cleared
            nbformat.write(builders[name](), HERE / name)
    for name in names:
        seconds = execute(name, args.timeout)
        size = (HERE / name).stat().st_size
        print(f"executed {name} in {seconds:.0f} s ({size / 1024:.0f} KiB)", flush=True)


if __name__ == "__main__":
    main()
