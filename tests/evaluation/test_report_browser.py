"""The evaluation report in a real browser: images load, nothing overflows, captions and cautions."""

from __future__ import annotations

import pandas as pd

from clinical_moe.config import EvalConfig
from clinical_moe.evaluation import evaluate_runs
from clinical_moe.runs import load_run

from ..browser import check_report, find_browser
from .conftest import HEADS


def test_evaluation_report_renders_in_chromium(trained_runs, eval_store, tmp_path):
    find_browser()  # skip early (before evaluating) where there is no browser
    runs = [load_run(run_id=trained_runs[h], tracking_uri=eval_store) for h in HEADS]
    cfg = EvalConfig(rates=[0.0, 0.5, 0.9], mechanisms=["mcar", "mar", "mnar"], bootstrap=50)
    out = tmp_path / "eval"
    evaluate_runs(runs, cfg, out_dir=out)

    html = (out / "report.html").read_text()
    assert "Paired AUROC differences" in html and " − " in html
    assert "positives: unreliable" in html and "Warning" in html  # a 40-stay toy test split
    assert "<figcaption>auroc_vs_rate.png" not in html  # captions say what a figure shows
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["point"]) >= {"natural", "mcar@0.50"} and paired["ci_low"].notna().all()
    assert "unreliable" in (out / "summary.md").read_text()

    checks = check_report(out / "report.html", tmp_path / "screenshots")
    for r in checks.values():
        assert r["images"] == 3 and r["uncaptioned"] == 0
