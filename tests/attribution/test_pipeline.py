"""End to end: tiny synthetic corpus -> tiny training run -> ``clinical-moe attribute``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import clinical_moe.attribution as attribution_pkg
from clinical_moe.data.synthetic import generate_corpus
from pipelines import attribute as attribute_pipeline
from pipelines import cli
from pipelines import train as train_pipeline

REPO = Path(__file__).resolve().parents[2]
WORD = re.compile(r"[a-z]{4,}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 100-patient corpus, its cache and a tiny FuseMoE run tracked in a temp MLflow store."""
    tmp = tmp_path_factory.mktemp("attr_e2e")
    root = tmp / "corpus"
    generate_corpus(root, n_patients=100, seed=0, image_size=(48, 64), quiet=True, workers=1)
    uri = f"sqlite:///{tmp}/mlflow.db"
    overrides = {
        "data.root": root,
        "data.cache_dir": tmp / "cache",
        "data.image_size": 32,
        "data.ecg_samples": 256,
        "data.note_max_len": 32,
        "data.note_vocab": 300,
        "data.workers": 1,
        "train.checkpoint_dir": tmp / "ckpt",
        "train.num_threads": 1,
        "tracking.log_model": "false",
        "tracking.run_name": "attr-e2e",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow puts a new experiment's artifacts under ./mlruns
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        torch.set_num_threads(1)
        args = [
            "--config",
            str(REPO / "configs" / "tiny" / "fusemoe.yaml"),
            "--quiet",
            *[f"{k}={v}" for k, v in overrides.items()],
        ]
        assert train_pipeline.main(args) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clinical_moe")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'attr-e2e'")
    return {
        "tmp": tmp,
        "root": root,
        "uri": uri,
        "client": client,
        "run_id": run.info.run_id,
        "checkpoint": tmp / "ckpt" / "attr-e2e" / "best.pt",
    }


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _note_words(root: Path) -> tuple[set[str], list[str]]:
    words, lines = set(), []
    for kind in ("radiology", "discharge"):
        for text in pd.read_csv(root / "mimic-iv-note" / "note" / f"{kind}.csv.gz")["text"]:
            words |= set(WORD.findall(str(text).lower()))
            lines += [ln.strip() for ln in str(text).splitlines() if len(ln.strip()) >= 20]
    return words, lines


def _own_words() -> set[str]:
    """Words our own code and pandas' HTML markup put in a report (not patient text)."""
    files = [*Path(attribution_pkg.__file__).parent.glob("*.py"), Path(attribute_pipeline.__file__)]
    words = set()
    for f in files:
        words |= set(WORD.findall(f.read_text().lower()))
    return words | set(WORD.findall(pd.DataFrame({"a": [1.5]}).to_html().lower()))


def test_attribute_writes_tables_report_and_mlflow_artifacts(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    out = tmp_path / "attr"
    tables = attribute_pipeline.attribute(run_id=trained["run_id"], out=out, quiet=True)

    per = tables["per_stay"]
    test_ids = pd.read_parquet(trained["tmp"] / "cache" / "manifest.parquet").query(
        "split == 'test'"
    )["stay_id"]
    assert sorted(per["stay_id"]) == sorted(test_ids) and len(per) >= 3
    mods = ("ehr", "cxr", "ecg", "notes")
    shap = per[[f"shapley_{m}" for m in mods]].to_numpy()
    np.testing.assert_allclose(shap.sum(1), per["log_odds"] - per["base_log_odds"], atol=1e-4)
    assert np.all(shap[~per[[f"has_{m}" for m in mods]].to_numpy(bool)] == 0)
    # the attributed risk is the trained model's prediction on the test split
    from clinical_moe.runs import load_run
    from clinical_moe.training.engine import predict

    loaded = load_run(checkpoint=trained["checkpoint"])
    from clinical_moe.data.dataset import Collator

    loader = torch.utils.data.DataLoader(
        loaded.data.test, batch_size=16, collate_fn=Collator(loaded.data.test)
    )
    ids, _, logits = predict(loaded.model, loader, "cpu")
    risk = pd.Series(torch.sigmoid(logits[:, 0]).numpy(), index=ids)
    np.testing.assert_allclose(
        per.set_index("stay_id")["risk"], risk.loc[per["stay_id"]], atol=1e-5
    )
    prevalence = loaded.data.train.labels.mean()
    np.testing.assert_allclose(per["base_log_odds"], np.log(prevalence / (1 - prevalence)))

    for name in (
        "per_stay",
        "modality_summary",
        "pattern_summary",
        "routing_by_modality",
        "routing_specialisation",
        "faithfulness",
    ):
        assert (out / "tables" / f"{name}.csv").is_file()
        back = pd.read_parquet(out / "tables" / f"{name}.parquet")
        assert len(back) == len(tables[name])
    assert not tables["routing_by_modality"].empty  # FuseMoE routes
    assert (out / "figures" / "routing_layer0.png").is_file()
    faith = tables["faithfulness"]
    assert "status" not in set(faith["metric"])  # the synthetic truth was found
    assert {"spearman_pooled", "cardiac_only_ecg_top1_abs"} <= set(faith["metric"])

    client, run_id = trained["client"], trained["run_id"]
    arts = _artifacts(client, run_id, "attribution")
    assert {
        "attribution/report.html",
        "attribution/tables/per_stay.csv",
        "attribution/tables/per_stay.parquet",
        "attribution/figures/importance.png",
    } <= arts
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "attribution/shapley/spearman_pooled" in run.data.metrics
    assert any(k.startswith("attribution/shapley/mean_abs/") for k in run.data.metrics)

    # privacy: no note text in the report or the tables
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    text = re.sub(r'src="data:image/png;base64,[^"]+"', "", html).lower()
    text += "".join(p.read_text().lower() for p in (out / "tables").glob("*.csv"))
    words, lines = _note_words(trained["root"])
    assert len(words) > 50 and lines
    leaked = (words & set(WORD.findall(text))) - _own_words()
    assert not leaked, f"note words in the report: {sorted(leaked)[:10]}"
    assert not [ln for ln in lines if ln.lower() in text]
    for sid in per.sort_values("risk", ascending=False)["stay_id"].head(3):
        assert str(sid) in html  # high-risk stays are named by stay id
    # which modality is off, per modality against the ideal observer (issue 12)
    assert "Agreement with the observer" in html
    assert "attribution/shapley/agreement_ehr_age_slope" in run.data.metrics
    # ... and which missing-modality path: every coalition's value, the head's and the observer's
    from clinical_moe.attribution.game import coalition_name

    codes = per[[f"has_{m}" for m in mods]].to_numpy(int) @ (1 << np.arange(4))
    own = [per.loc[i, f"coalition_{coalition_name(c, mods)}"] for i, c in enumerate(codes)]
    np.testing.assert_allclose(own, per["log_odds"], atol=1e-4)  # v(natural) = the prediction
    assert per.loc[~per["has_cxr"].astype(bool), "coalition_cxr"].isna().all()
    coal = faith[faith["group"] == "coalition_agreement"]
    assert {"coalition_all_ehr_bias", "coalition_all_ehr+ecg_resid_sd"} <= set(coal["metric"])
    assert "Coalition values against the ideal observer" in html
    assert "&lt;NA&gt;" not in html  # an empty group's n is a dash, like its figures
    assert not any("coalition_" in k for k in run.data.metrics)  # in the tables, not MLflow


def test_cli_from_a_checkpoint(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    out = tmp_path / "cli"
    assert (
        cli.main(
            [
                "attribute",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--out",
                str(out),
                "--max-stays",
                "3",
                "--quiet",
                "--ig-steps",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and "3 test stays" in printed
    per = pd.read_csv(out / "tables" / "per_stay.csv")
    assert len(per) == 3 and per.filter(like="ig_").isna().all().all()  # IG skipped
    assert per.filter(like="shapley_").notna().all().all()
    summary = pd.read_csv(out / "tables" / "modality_summary.csv")
    assert set(summary["method"]) == {"shapley", "ablation"}


def test_report_renders_in_chromium(trained, tmp_path, monkeypatch):
    """The attribution report in a real browser: images load, nothing overflows, captions."""
    from ..browser import check_report, find_browser

    find_browser()  # skip (with the reason) where no Chromium is installed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    out = tmp_path / "attr"
    attribute_pipeline.attribute(run_id=trained["run_id"], out=out, quiet=True)

    html = (out / "report.html").read_text()
    assert "<h2>Routing</h2>" in html and "How to read" in html
    assert "positives: unreliable" in html and "Warning" in html  # a 9-stay toy test split
    checks = check_report(out / "report.html", tmp_path / "screenshots")
    for r in checks.values():
        assert r["images"] >= 4 and r["uncaptioned"] == 0


def test_a_run_trained_on_older_ehr_scaling_is_refused(trained, tmp_path):
    """Weights learned on unstandardised static EHR features are not fed standardised ones."""
    import shutil

    from clinical_moe.data.cache import StaleCacheError
    from clinical_moe.runs import load_run
    from clinical_moe.training.checkpoint import load_checkpoint

    state = load_checkpoint(trained["checkpoint"])
    assert state["ehr_scaling"] == 2  # what the trainer records: the cache's scaling
    load_run(checkpoint=trained["checkpoint"])  # loads

    old = tmp_path / "old_run"  # the same run as a checkpoint written before the change
    old.mkdir()
    shutil.copy(trained["checkpoint"].parent / "config.yaml", old / "config.yaml")
    del state["ehr_scaling"]
    torch.save(state, old / "best.pt")
    with pytest.raises(StaleCacheError, match="scaling version 1 .* now gives version 2"):
        load_run(checkpoint=old / "best.pt")
