"""Write ``01_quickstart.ipynb`` and ``02_missingness.ipynb`` (outputs cleared) with nbformat.

Run from anywhere: ``python notebooks/_make_notebooks.py``. Editing the cells here and
regenerating keeps the notebooks reviewable as plain Python. Both notebooks read:

- ``CLINICAL_MOE_NB_SMALL=1``: a small corpus and short training (the tests use it; < 2 min);
  otherwise the medium setting (1,500 patients, 64-96 px radiographs; the committed outputs,
  written by ``python notebooks/_execute.py``);
- ``CLINICAL_MOE_NB_DIR``: where corpus, cache, checkpoints and reports go (default
  ``runs/notebooks``);
- ``MLFLOW_TRACKING_URI``: the MLflow store (default ``sqlite:///<work dir>/mlflow.db``).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
import sys
from pathlib import Path

# The repository root (the notebook may be started from notebooks/ or from the root).
REPO = Path.cwd() if (Path.cwd() / "configs").is_dir() else Path.cwd().parent
sys.path.insert(0, str(REPO))
SMALL = os.environ.get("CLINICAL_MOE_NB_SMALL") == "1"
WORK = Path(os.environ.get("CLINICAL_MOE_NB_DIR", REPO / "runs" / "notebooks")).resolve()
WORK.mkdir(parents=True, exist_ok=True)
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{WORK / 'mlflow.db'}"
os.environ["MLFLOW_TRACKING_URI"] = TRACKING_URI

from mlflow.tracking import MlflowClient

# Keep run artifacts under the work dir (a SQLite store would put them in ./mlruns).
if MlflowClient(TRACKING_URI).get_experiment_by_name("clinical_moe") is None:
    MlflowClient(TRACKING_URI).create_experiment("clinical_moe",
                                                 artifact_location=str(WORK / "mlartifacts"))

import torch

if SMALL:
    torch.set_num_threads(1)  # small runs: one thread avoids oversubscribing shared CPUs

SIZES = dict(
    n_patients=300 if SMALL else 1500,
    image_size=(64, 96),  # radiograph side range in the corpus (px)
    cache_overrides=(["data.image_size=32", "data.ecg_samples=250", "data.workers=1"] if SMALL
                     else ["data.image_size=64", "data.ecg_samples=1250", "data.workers=2"]),
    train_overrides=(["train.epochs=2", "train.max_steps_per_epoch=8"] if SMALL
                     else ["train.epochs=8", "train.max_steps_per_epoch=null"]),
    bootstrap=100 if SMALL else 500,
)
CORPUS, CACHE = WORK / "corpus", WORK / "cache"
print(f"small={SMALL} work dir={WORK} tracking={TRACKING_URI}")
if SMALL:
    print("SMALL MODE: 300 patients and 2 short epochs; the test split holds a few dozen stays, "
          "so AUROCs sit near chance and several groups have n = 0 or a handful of stays: the "
          "numbers below only show that the code runs.")
'''

SMALL_NOTE = (
    "> **Small mode (`CLINICAL_MOE_NB_SMALL=1`, what the tests run): the numbers mean nothing.** "
    "300 patients and two short epochs leave a test split of a few dozen stays and a model that "
    "has barely learned: AUROCs near chance (0.5) with CIs spanning most of [0, 1], natural "
    "modality combinations with n = 0-3 stays (n/a or a lucky 1.00), and every row of the reports "
    "marked \"unreliable\". Without the variable the notebook uses the 1,500-patient medium "
    "setting (the committed outputs), where the heads learn and the comparisons carry information."
)

DATA = '''\
from clinical_moe.config import load_config
from clinical_moe.data.cache import build_cache
from clinical_moe.data.synthetic import generate_corpus

if not (CORPUS / "truth" / "stays.csv.gz").is_file():
    summary = generate_corpus(CORPUS, n_patients=SIZES["n_patients"], seed=0,
                              image_size=SIZES["image_size"], quiet=True)
    print("\\n".join(summary.lines()))

DATA_OVERRIDES = [f"data.root={CORPUS}", f"data.cache_dir={CACHE}", *SIZES["cache_overrides"]]
if not (CACHE / "manifest.parquet").is_file():
    build_cache(load_config(REPO / "configs" / "tiny" / "late.yaml", DATA_OVERRIDES), quiet=True)
import json

summary = json.loads((CACHE / "summary.json").read_text())
print("stays per split:", summary["split_counts"])
print("stays with each modality:", summary["present_counts"])
'''

TRAIN_FN = '''\
from clinical_moe.training.checkpoint import CheckpointDir
from pipelines.train import train


def train_head(head, *extra, name=None):
    """Train configs/tiny/<head>.yaml on the cache; return the MLflow run id."""
    overrides = [*DATA_OVERRIDES, *SIZES["train_overrides"],
                 f"train.checkpoint_dir={WORK / 'checkpoints'}", f"tracking.uri={TRACKING_URI}",
                 f"tracking.run_name={name or 'nb-' + head}", "tracking.log_model=false", *extra]
    if SMALL:
        overrides.append("train.num_threads=1")
    cfg = load_config(REPO / "configs" / "tiny" / f"{head}.yaml", overrides)
    return CheckpointDir(train(cfg, quiet=True)).read_run()["run_id"]  # this run's own folder
'''


def quickstart() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# Quickstart: synthetic corpus -> cache -> training -> evaluation\n\n"
            "Everything runs on a CPU. Set `CLINICAL_MOE_NB_SMALL=1` for a small, fast run "
            "(what the tests do); without it the notebook uses the 1,500-patient medium setting "
            "(the committed outputs; re-execute with `python notebooks/_execute.py`). "
            "Files go to `CLINICAL_MOE_NB_DIR` (default `runs/notebooks`), runs to the MLflow "
            "store in `MLFLOW_TRACKING_URI`."),
        new_code_cell(SETUP),
        new_markdown_cell(SMALL_NOTE),
        new_markdown_cell(
            "## 1. A synthetic MIMIC-style corpus and its preprocessing cache\n\n"
            "`generate_corpus` writes MIMIC-IV tables, CXR DICOMs, ECG WFDB records and notes in "
            "the real layouts, plus `truth/` (the true risk of each stay). `build_cache` reads "
            "them once into compact arrays (same as `clinical-moe synth` and "
            "`clinical-moe preprocess`)."),
        new_code_cell(DATA),
        new_markdown_cell(
            "## 2. Train one fusion head\n\n"
            "The tiny FuseMoE config trains in seconds; the run (config, metrics, best "
            "checkpoint) is tracked in MLflow (same as `clinical-moe train --config "
            "configs/tiny/fusemoe.yaml`)."),
        new_code_cell(TRAIN_FN + "\nrun_id = train_head(\"fusemoe\")\nprint(\"MLflow run:\", "
                      "run_id)"),
        new_markdown_cell(
            "## 3. Evaluate it under simulated missingness\n\n"
            "One call scores the natural test split, MCAR drops at a few rates and every fixed "
            "modality pattern, with bootstrap 95% CIs; the files are also logged to the run as "
            "MLflow artifacts (same as `clinical-moe evaluate --run-id ...`)."),
        new_code_cell('''\
from clinical_moe.config import EvalConfig
from pipelines.evaluate import evaluate

eval_cfg = EvalConfig(mechanisms=["mcar"], rates=[0.0, 0.25, 0.5, 0.75, 0.9],
                      bootstrap=SIZES["bootstrap"])
grid = evaluate(run_ids=[run_id], out=WORK / "eval" / "quickstart", eval_cfg=eval_cfg,
                tracking_uri=TRACKING_URI)
print("oracle AUROC (true risk, same stays):", round(grid.attrs["oracle_auroc"], 3))
grid[(grid["metric"] == "auroc") & (grid["mechanism"] != "pattern")][
    ["point", "value", "ci_low", "ci_high", "n"]].round(3)
'''),
        new_code_cell('''\
from IPython.display import Image, display

out = Path(grid.attrs["out_dir"])
display(Image(filename=str(out / "auroc_vs_rate.png")))
print("full report:", out / "report.html")
'''),
    ]
    return _notebook(cells)


def missingness() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# Comparing fusion heads under missing modalities\n\n"
            "Several heads are trained on the same cache and evaluated with **one** call, so "
            "every head is scored on identical masks: MCAR (at random), MAR (depends on an "
            "observed severity proxy), MNAR (depends on the outcome), and each fixed subset of "
            "modalities. Set `CLINICAL_MOE_NB_SMALL=1` for a fast run."),
        new_code_cell(SETUP),
        new_markdown_cell(SMALL_NOTE),
        new_code_cell(DATA),
        new_markdown_cell(
            "## Train the heads\n\n"
            "Late fusion (a per-modality classifier, averaged) against MoE heads. The small "
            "setting trains two heads; the demo setting four."),
        new_code_cell(TRAIN_FN + '''
HEADS = ["late", "fusemoe"] if SMALL else ["late", "fusemoe", "flex_moe", "conf_smoe"]
run_ids = {head: train_head(head, name=f"nb02-{head}") for head in HEADS}
run_ids
'''),
        new_markdown_cell(
            "## One evaluation call for all heads\n\n"
            "Masks are drawn from the seed and the data (stay ids, labels, covariates), never "
            "from a model; the runs must share the cache (a different test split is refused)."),
        new_code_cell('''\
from clinical_moe.config import EvalConfig
from pipelines.evaluate import evaluate

eval_cfg = EvalConfig(mechanisms=["mcar", "mar", "mnar"],
                      rates=[0.0, 0.3, 0.6, 0.9] if SMALL else [round(0.1 * i, 1) for i in range(10)],
                      bootstrap=SIZES["bootstrap"])
grid = evaluate(run_ids=list(run_ids.values()), out=WORK / "eval" / "missingness",
                eval_cfg=eval_cfg, tracking_uri=TRACKING_URI)
print("rows:", len(grid), "| logged to MLflow run", grid.attrs["mlflow_run_id"])
grid.head(10)
'''),
        new_markdown_cell("AUROC (with 95% CI) per head, mechanism and rate:"),
        new_code_cell('''\
auroc = grid[(grid["metric"] == "auroc") & grid["mechanism"].isin(eval_cfg.mechanisms)]
auroc.pivot_table(index=["mechanism", "rate"], columns="run", values="value").round(3)
'''),
        new_code_cell('''\
from IPython.display import Image, display

out = Path(grid.attrs["out_dir"])
display(Image(filename=str(out / "auroc_vs_rate.png")))
display(Image(filename=str(out / "patterns.png")))
'''),
        new_markdown_cell(
            "Natural missingness, broken down by which modalities each test stay actually has:"),
        new_code_cell('''\
import pandas as pd

natural = pd.read_csv(out / "natural.csv")
natural[natural["metric"] == "auroc"].pivot_table(
    index=["pattern", "n"], columns="run", values="value").round(3)
'''),
        new_code_cell('print("tables, plots and the HTML report:", out)\n'
                      'sorted(p.name for p in out.iterdir())'),
    ]
    return _notebook(cells)


def _notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    for name, build in (("01_quickstart.ipynb", quickstart), ("02_missingness.ipynb", missingness)):
        nb = build()
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
