"""Smoke tests of the benchmarks: each one's smallest configuration, in-process, on one thread.

They check that every report has its documented keys and sane (finite, positive) numbers, so a
benchmark that silently measures nothing fails here. The figures themselves are not checked.
"""

from __future__ import annotations

import json
import math
import platform

import pytest
import torch
import yaml

from benchmarks import bench_moe, bench_pipeline, bench_train, run_all
from benchmarks.common import ratio, time_interleaved

# The module's fixtures build on each other: keep its tests on one xdist worker (make test).
pytestmark = pytest.mark.xdist_group(name="benchmarks")

SMALL_IMAGES = ["--image-size", "32", "48"]
PATIENTS = "60"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_environment(report: dict) -> None:
    env = report["environment"]
    assert env["machine"]["cpu_model"] and positive(env["machine"]["cores_logical"])
    assert positive(env["machine"]["ram_gb"])
    assert set(env["versions"]) == {"python", "torch", "numpy", "clinical_moe"}
    assert "git_commit" in env and "load_average" in env
    assert isinstance(report["machine_loaded"], bool)
    assert report["other_processes_cores"] is None or report["other_processes_cores"] >= 0


def check_written(report: dict, path) -> None:
    assert json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))


@pytest.fixture(scope="module")
def moe_report(work):
    argv = [
        "--experts",
        "4",
        "--top-k",
        "2",
        "--tokens",
        "256",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--i2moe-batch",
        "4",
        "--out",
        str(work / "moe.json"),
    ]
    return bench_moe.main(argv, quiet=True)


@pytest.fixture(scope="module")
def pipeline_report(work):
    argv = [
        "--in-process",
        "--sizes",
        PATIENTS,
        *SMALL_IMAGES,
        "--workers",
        "1",
        "--decode-files",
        "4",
        "--decode-reps",
        "1",
        "--decode-j2k-files",
        "2",
        "--decode-j2k-shape",
        "96",
        "80",
        "--work",
        str(work),
        "--out",
        str(work / "pipeline.json"),
    ]
    return bench_pipeline.main(argv, quiet=True)


@pytest.fixture(scope="module")
def train_report(work, pipeline_report):  # reuses the pipeline's corpus
    argv = [
        "--in-process",
        "--patients",
        PATIENTS,
        *SMALL_IMAGES,
        "--heads",
        "fusemoe",
        "--tiers",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--ddp",
        "--work",
        str(work),
        "--out",
        str(work / "train.json"),
    ]
    return bench_train.main(argv, quiet=True)


def test_helpers():
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None
    calls = []
    times = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 1, 2)
    assert calls == ["a", "b"] * 3 and len(times) == 2 and all(len(t) == 2 for t in times)


def test_bench_moe(moe_report, work):
    check_environment(moe_report)
    check_written(moe_report, work / "moe.json")
    (row,) = moe_report["results"]
    assert (row["experts"], row["top_k"], row["tokens"]) == (4, 2, 256)
    assert all(
        positive(row[k]) for k in ("moe_ms", "dense_ms", "ratio", "ratio_of_min", "ratio_paired")
    )
    i2 = moe_report["i2moe"]
    assert all(positive(i2[k]) for k in ("i2moe_ms", "backbone_ms", "ratio"))
    assert i2["work_ratio"] >= i2["experts"] and i2["stacked_rows"] >= i2["batch_size"] == 4
    target = moe_report["target"]
    assert target["measured_ratio"] is None and target["met"] is None  # point not in this grid


def test_bench_pipeline(pipeline_report, work):
    check_environment(pipeline_report)
    check_written(pipeline_report, work / "pipeline.json")
    (size,) = pipeline_report["sizes"]
    syn, pre = size["synth"], size["preprocess"]
    for k in ("stays_per_s", "dicoms_per_s", "ecgs_per_s", "peak_rss_tree_mb", "seconds"):
        assert positive(syn[k]) and positive(pre[k]), k
    assert pre["num_stays"] > 0 and pre["skipped_files"] == 0 and 0 < pre["plan_share"] < 1
    assert positive(size["corpus_mb"]) and pipeline_report["scaling_with_workers"] == []
    (row,) = pipeline_report["scaling_with_size"]
    assert row["preprocess_rate_vs_smallest"] == 1.0
    cxr, ecg = pipeline_report["decode"]["cxr"], pipeline_report["decode"]["ecg"]
    assert cxr["files"] == ecg["files"] == 4
    for k in (
        "bare_pydicom_files_per_s",
        "read_cxr_transform_files_per_s",
        "ratio_read_cxr",
        "ratio_read_cxr_transform",
    ):
        assert positive(cxr[k]), k
    for k in ("bare_wfdb_files_per_s", "read_ecg_files_per_s", "ratio_read_ecg"):
        assert positive(ecg[k]), k
    j2k = pipeline_report["decode"]["cxr_j2k_full_size"]
    assert "error" not in j2k and j2k["files"] == 2 and j2k["shape"] == [96, 80]
    assert positive(j2k["ratio_read_cxr_transform"]) and positive(j2k["bare_pydicom_files_per_s"])
    targets = pipeline_report["targets"]
    assert isinstance(targets["decode"]["dicom_met"], bool)
    assert isinstance(targets["decode"]["dicom_j2k_full_size_met"], bool)
    assert targets["rss_50k"]["met"] is None  # one size: nothing to extrapolate from


def test_bench_train(train_report, work):
    check_environment(train_report)
    check_written(train_report, work / "train.json")
    assert train_report["data"]["synth_reused"] is True
    (row,) = train_report["results"]
    assert "error" not in row and (row["head"], row["tier"]) == ("fusemoe", "tiny")
    for k in (
        "train_samples_per_s",
        "infer_samples_per_s",
        "load_samples_per_s",
        "peak_rss_mb",
        "parameters",
    ):
        assert positive(row[k]), k
    assert train_report["ddp_scaling"] == []


def test_run_all_summary(moe_report, pipeline_report, train_report):
    moe = run_all.summarize("moe", moe_report)
    assert moe["ratios"] == {"E4k2n256": moe_report["results"][0]["ratio"]}
    assert positive(moe["i2moe"]["ratio"])
    pipe = run_all.summarize("pipeline", pipeline_report)
    assert positive(pipe["sizes"][0]["preprocess_stays_per_s"])
    assert set(pipe["decode_ratios"]["cxr"]) == {"ratio_read_cxr", "ratio_read_cxr_transform"}
    train = run_all.summarize("train", train_report)
    assert positive(train["results"][0]["train_samples_per_s"])
    json.dumps([moe, pipe, train])


def test_run_all_summarises_saved_reports(moe_report, pipeline_report, train_report, work):
    specs = [f"{name}={work / f'{name}.json'}" for name in ("moe", "pipeline", "train")]
    out = work / "summary.json"
    summary = run_all.main(["--from", *specs, "--out", str(out)])
    assert summary["results"]["moe"] == run_all.summarize("moe", moe_report)
    assert summary["results"]["train"] == run_all.summarize("train", train_report)
    assert (
        json.loads(out.read_text())["from_saved_reports"]["pipeline"]["git_commit"]
        == (pipeline_report["environment"]["git_commit"])
    )
    with pytest.raises(SystemExit, match="NAME=FILE"):
        run_all.main(["--from", "nonsense"])


def test_bench_quality_two_heads_two_seeds(tmp_path):
    from benchmarks import bench_quality

    argv = ["--n-patients", "120", "--seeds", "0", "1", "--heads", "late", "concat"]
    argv += ["--config-dir", "configs/tiny", "--bootstrap", "10", "--image-size", "32", "48"]
    argv += ["--epochs", "1", "--work", str(tmp_path), "--out", str(tmp_path / "quality.json")]
    argv += [
        "--attribute",
        "concat",
        "--",
        "pretrain.epochs=1",
        "pretrain.max_steps_per_epoch=2",
    ]
    report = bench_quality.main(argv, quiet=True)
    for run in ("late-n120-s0", "concat-n120-s1"):  # --epochs reaches every run's config
        saved = yaml.safe_load((tmp_path / "checkpoints" / run / "config.yaml").read_text())
        assert saved["train"]["epochs"] == 1, run
    # issue 12: encoders pretrained once per seed and shared by every head, probed per head
    assert (tmp_path / "pretrained-n120-s1" / "cxr.pt").is_file()
    probe = report["encoder_probe"]["concat"]
    assert {"cxr->pulmonary", "ecg->cardiac"} <= set(probe)
    assert set(probe["cxr->pulmonary"]["per_seed"]) == {0, 1}
    assert "targets_probe" in report and "concat" in report["faithfulness"]
    check_environment(report)
    check_written(report, tmp_path / "quality.json")
    assert set(report["heads"]) == {"late", "concat"}
    for head in report["heads"].values():
        for k in ("auroc_natural", "auroc_of_oracle_natural", "time_to_best_s", "train_wall_s"):
            assert positive(head[k]), k
        assert head["auroc_natural_sd"] is not None  # two seeds
        lo, hi = head["auroc_natural_ci_first_seed"]
        assert 0 <= lo <= hi <= 1
    assert 0.5 < report["oracle_auroc_mean"] < 1
    # issue 12: the ceiling of each point is measured on the synthetic corpus, below the oracle
    assert 0.5 < report["ceiling_auroc_natural_mean"] <= report["oracle_auroc_mean"]
    assert all(positive(h["auroc_over_ceiling_natural"]) for h in report["heads"].values())
    assert "best_head_ge_0.99_ceiling" in report["targets_ceiling"]
    table = bench_quality.pd.read_csv(report["table"])
    assert len(table) == 2 * 2 * 2  # seeds x heads x (natural, MCAR)
    # Each seed's table is kept; --reuse takes them instead of training again.
    cut = argv.index("--")
    again = bench_quality.main([*argv[:cut], "--reuse", *argv[cut:]], quiet=True)
    assert again["heads"] == report["heads"] and again["seconds"] < report["seconds"]
    summary = run_all.summarize("quality", report)
    assert set(summary["heads"]) == {"late", "concat"} and "best_head" in summary["targets"]
    # the learnable reference of the faithfulness target, on the same work folder
    from benchmarks import faithfulness_floor

    floor = faithfulness_floor.main(
        ["--work", str(tmp_path), "--n-patients", "120", "--seeds", "0", "1", "--copies", "1",
         "--mlp-epochs", "1", "--model-seeds", "0", "1"]
    )  # fmt: skip
    manifest = bench_quality.pd.read_parquet(tmp_path / "cache-n120-s0" / "manifest.parquet")
    first = floor["seeds"][0]
    assert first["n_train"] == int((manifest["split"] == "train").sum())
    assert set(first["learners"]) == {"gbm", "logistic_per_pattern", "mlp_1ep"}
    assert [r["model_seed"] for r in first["learners"]["mlp_1ep"]["per_model_seed"]] == [0, 1]
    for s in floor["seeds"]:
        for res in s["learners"].values():
            assert 0 < res["full_log_odds_sd_vs_observer"] < 5
            top1 = res["single_factor_top1"]
            assert (top1 is None) == (s["n_single_factor"] == 0)
            assert top1 is None or 0 <= top1 <= 1
    assert positive(summary["heads"]["late"]["auroc_of_oracle_natural"])


def test_bench_quality_targets():
    from benchmarks.bench_quality import pd, summarise

    rows = []
    for seed in (0, 1):
        for head, nat, mis in (("late", 0.80, 0.70), ("fusemoe", 0.86, 0.82), ("concat", 0.7, 0.4)):
            for rate, auc in ((0.0, nat), (0.5, mis)):
                rows.append(
                    {
                        "seed": seed,
                        "head": head,
                        "rate": rate,
                        "value_auroc": auc,
                        "ci_low_auroc": auc - 0.05,
                        "ci_high_auroc": auc + 0.05,
                        "value_auprc": 0.5,
                        "auroc_of_oracle": auc / 0.9,
                        "oracle_auroc": 0.9,
                        "time_to_best_s": 3.0,
                        "train_wall_s": 4.0,
                    }
                )
    out = summarise(pd.DataFrame(rows), 0.5)
    t = out["targets"]
    assert t["best_head"] == "fusemoe" and t["best_head_drop_lt_late_drop"] is True
    assert abs(t["best_head_auroc_of_oracle"] - 0.86 / 0.9) < 1e-9
    assert t["best_head_ge_0.95_oracle"] is True and t["heads_with_drop_lt_late_drop"] == [
        "fusemoe"
    ]
    assert abs(out["heads"]["concat"]["auroc_drop_mcar0.5"] - 0.3) < 1e-9


def test_bench_shapes_quick(tmp_path):
    from benchmarks import bench_shapes

    out = tmp_path / "shapes.json"
    report = bench_shapes.main(["--quick", "--out", str(out)])
    check_environment(report)
    check_written(report, out)
    rows = {r["name"]: r for r in report["shapes"]}
    assert set(rows) == {s.name for s in bench_shapes.SHAPES}
    assert {r["head"] for r in rows.values()} == {"fusemoe", "flex_moe", "conf_smoe", "i2moe"}
    for r in rows.values():
        for key in ("params", "train_ms", "eval_ms", "peak_rss_mb", "matmul_gflops"):
            assert positive(r[key]), (r["name"], key, r[key])
        for key in ("train_gflop", "eval_gflop", "train_flop_fraction", "eval_flop_fraction"):
            assert positive(r[key]), (r["name"], key, r[key])
        assert r["train_gflop"] > r["eval_gflop"]  # backward counted
        assert r["reference_s"] and isinstance(r["meets_memory"], bool)
    assert positive(report["matmul_gflops_max"])
    assert set(report["targets"]) >= {"all_speed", "all_memory", "all_flop_fraction"}


def test_bench_allocator_quick(tmp_path):
    """Both settings run, alternating, and the report pairs them per shape."""
    from benchmarks import bench_allocator

    out = tmp_path / "allocator.json"
    report = bench_allocator.main(
        ["--quick", "--rounds", "2", "--shapes", "flex_moe_b8", "--out", str(out)]
    )
    check_environment(report)
    check_written(report, out)
    (row,) = report["shapes"]
    assert row["name"] == "flex_moe_b8"
    assert len(row["retained_train_ms"]) == len(row["default_train_ms"]) == 2
    assert positive(row["default_over_retained_train"])
    assert all(positive(v) for v in row["retained_peak_rss_mb"] + row["default_peak_rss_mb"])
    assert row["default_applied"] == [False, False]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert row["retained_applied"] == [True, True]


def test_bench_stages_small(tmp_path):
    """Issue 13's benchmark on 60 patients: every step runs, the identity checks hold."""
    pytest.importorskip(
        "ray", reason='needs the optional dependency: pip install "clinical-moe[ray]"'
    )
    from benchmarks import bench_stages
    from clinical_moe.data.synthetic import generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_patients=60, seed=2, workers=1, image_size=(32, 48), quiet=True)
    out = tmp_path / "stages.json"
    bench_stages.main(
        ["--corpus", str(corpus), "--work", str(tmp_path / "w"), "--rounds", "1", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["full"]["decode"]["decoded"] > 0 and report["new_task"]["decode"]["decoded"] == 0
    assert report["new_task_identical_to_scratch"] and report["shards_identical_to_full"]
    assert report["engines"][0]["stores_identical"]
    assert positive(report["new_task_over_full"]) and positive(report["ray_over_pool_median"])
    assert not (tmp_path / "w" / "stages").exists()  # scratch removed unless --keep


def test_bench_note_store_small(tmp_path):
    """The note-store benchmark on 40 patients: a second pass tokenizes nothing, same ids."""
    pytest.importorskip(
        "transformers", reason='needs the optional dependency: pip install "clinical-moe[hf]"'
    )
    from benchmarks import bench_note_store
    from clinical_moe.data.synthetic import generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_patients=40, seed=4, workers=1, image_size=(32, 32), quiet=True)
    out = tmp_path / "notes.json"
    bench_note_store.main(["--corpus", str(corpus), "--vocab", "200", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["identical_ids"] and report["notes"] > 0
    assert report["counts"]["first"]["tokenized"] == report["notes"]
    assert report["counts"]["again"] == {"tokenized": 0, "from_store": report["notes"]}
    assert positive(report["again_over_direct"])


def test_bench_demo_load_reads_the_demo_timings():
    """The demo-load benchmark takes its per-step times from the demo's own ``timings:`` line."""
    from benchmarks.bench_demo_load import _timings

    out = "cache: x\ntimings:            synth_s 21, preprocess_s 10, train_late_s 23\nbrowse"
    assert _timings(out) == {"synth_s": 21.0, "preprocess_s": 10.0, "train_late_s": 23.0}
    assert _timings("no such line") == {}
