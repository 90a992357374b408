"""``make demo``'s pipeline end to end at a tiny size: every step runs and says where its results are."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def test_demo_runs_every_step_and_prints_where_results_are(tmp_path, monkeypatch, capsys):
    from pipelines import demo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "demo"
    code = demo.main(
        [
            "--out",
            str(out),
            "--n-patients",
            "120",
            "--config-dir",
            "configs/tiny",
            "--image-size",
            "48",
            "64",
            "--quiet",
            "tracking.log_model=false",
            "train.num_threads=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for path in (
        out / "evaluation" / "report.html",
        out / "attribution" / "report.html",
        out / "cache" / "summary.json",
        out / "corpus" / "truth",
    ):
        assert path.exists(), path
        assert str(path) in printed
    assert "oracle (true risk)" in printed and "mean |Shapley|" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("faithfulness (Shapley)"))
    assert len(line) < 200 and "rank correlation with the ideal observer" in line
    assert printed.count("MLflow run:") == 2

    # a second run reuses the corpus and the cache, and trains new runs
    assert (
        demo.main(
            [
                "--out",
                str(out),
                "--config-dir",
                "configs/tiny",
                "--heads",
                "late",
                "--quiet",
                "tracking.log_model=false",
                "train.num_threads=1",
            ]
        )
        == 0
    )
    assert "reusing the corpus" in capsys.readouterr().out
