"""Evaluation of trained runs under simulated missingness (issue #6).

- :mod:`.context`: what masks may depend on (test split covariates, labels, content summaries),
  the test split fingerprint and the synthetic oracle;
- :mod:`.inference`: predictions under many masks with one encoder pass per batch;
- :mod:`.grid`: :func:`evaluate_runs` - the grid of mechanisms x rates and fixed patterns;
- :mod:`.plots` and :mod:`.report`: figures, tidy tables, Markdown and HTML.

The command line and MLflow logging live in ``pipelines/evaluate.py``.
"""

from clinical_moe.evaluation.grid import (
    GRID_COLUMNS,
    GridResult,
    IncomparableRunsError,
    evaluate_runs,
    run_grid,
)

__all__ = ["GRID_COLUMNS", "GridResult", "IncomparableRunsError", "evaluate_runs", "run_grid"]
