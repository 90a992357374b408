"""What a learner that decodes every modality perfectly reaches on the faithfulness target.

The single-factor target (``clinical_moe.attribution.single_factor``) compares a head's
Shapley values with the *ideal observer's*: the exact posterior of the generative story. A head
learns its posterior from the train split's labels (~8,700 stays at 20,000 patients), so it
cannot be that posterior exactly even if it decoded every modality perfectly. This script
measures how far such a perfect decoder gets when it, too, has to learn from those labels:

- the features are exactly what each shown modality reveals to the observer
  (:class:`clinical_moe.data.synthetic.ceiling.Evidence`: severity, infection and age for the EHR;
  cardiac and heart rate for the ECG; findings and devices per CXR study; note bands and
  mentions; a presence flag per modality), zeroed where the modality is not shown;
- a gradient-boosted classifier (scikit-learn) is trained on the cache's train split with the
  mortality label, on the natural masks plus ``--copies`` copies with MCAR ``--dropout`` masks
  (at least one modality kept), like the heads' modality dropout, so that every coalition is a
  trained input;
- on the test split its 2^M coalition values give exact Shapley values, scored with the same
  single-factor groups and top-1 rule as the heads (the groups read from a head's saved
  ``faithfulness_per_stay`` table).

It prints and writes per seed: the learner's top-1 on the single-factor stays, the SD of its
full log-odds and of its EHR Shapley values against the observer's (the heads' figures sit beside
them in ``faithfulness_n<N>.csv`` / the ``observer_agreement`` rows). A head at this level is as
faithful as learning from these labels allows; the gap to 1 is the labels' doing, not the head's.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.faithfulness_floor --work runs/bq2 --n-patients 20000 \\
        --seeds 0 1 2 --out benchmarks/results/faithfulness_floor_n20000.json
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import add_common_args, environment, finish, set_threads

MODS = ("ehr", "cxr", "ecg", "notes")


def features(ev, rows: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """What each shown modality of the stays ``rows`` reveals (``Evidence`` fields), zero where
    the modality is not shown; ``shown (n, 4)`` -> ``(n, F)``."""
    e, c, g, n = (shown[:, i].astype(float) for i in range(4))
    return np.column_stack(
        [
            e,
            ev.severity[rows] * e,
            ev.infection[rows] * e,
            (ev.age[rows] - 65.0) / 15.0 * e,
            g,
            ev.cardiac[rows] * g,
            np.nan_to_num(ev.hr[rows] - 80.0) * g,
            c,
            ev.findings[rows] * c[:, None],
            ev.devices[rows] * c[:, None],
            n,
            ev.bands[rows] * n[:, None],
            ev.mentions[rows] * n[:, None],
        ]
    )


def mcar_masks(has: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``has`` with each present modality dropped at ``rate``, at least one kept per row."""
    shown = has & ~(rng.random(has.shape) < rate)
    for i in np.flatnonzero(~shown.any(1) & has.any(1)):
        shown[i, rng.choice(np.flatnonzero(has[i]))] = True
    return shown


def one_seed(work: Path, n_patients: int, seed: int, args) -> dict:
    """The learner's figures on one seed's corpus, cache and saved single-factor groups."""
    from scipy.special import logit
    from sklearn.ensemble import HistGradientBoostingClassifier

    from clinical_moe.attribution.observer import shapley_from_values
    from clinical_moe.data.synthetic.observer import evidence_from_truth

    cache = work / f"cache-n{n_patients}-s{seed}"
    truth = work / f"corpus-n{n_patients}-s{seed}" / "truth"
    man = pd.read_parquet(cache / "manifest.parquet")
    stays = pd.read_csv(truth / "stays.csv.gz").drop_duplicates("stay_id").set_index("stay_id")
    studies = pd.read_csv(truth / "studies.csv.gz")
    rows = stays.loc[man["stay_id"]].reset_index()
    has = man[[f"has_{m}" for m in MODS]].to_numpy(bool)  # (N, 4)
    ev = evidence_from_truth(rows, studies[studies["stay_id"].isin(man["stay_id"])])
    ev = ev.with_natural(has, MODS)
    y = man["mortality"].to_numpy(float)
    train = np.flatnonzero((man["split"] == "train").to_numpy())
    test = np.flatnonzero((man["split"] == "test").to_numpy())

    rng = np.random.default_rng(seed)
    masks = [has] + [mcar_masks(has, args.dropout, rng) for _ in range(args.copies)]
    X = np.vstack([features(ev, train, s[train]) for s in masks])
    Y = np.concatenate([y[train]] * len(masks))
    model = HistGradientBoostingClassifier(
        max_iter=400, learning_rate=0.03, max_leaf_nodes=15, l2_regularization=1.0, random_state=0
    ).fit(X, Y)

    base = float(logit(y[train].mean()))  # v(empty): the heads' baseline too
    values = {}
    for bits in itertools.product((0, 1), repeat=len(MODS)):
        shown = has[test] & np.array(bits, bool)[None, :]
        p = model.predict_proba(features(ev, test, shown))[:, 1]
        lo = logit(np.clip(p, 1e-6, 1 - 1e-6))
        values[bits] = np.where(shown.any(1), lo, base)
    phi = np.where(has[test], shapley_from_values(values, len(MODS)), 0.0)  # (n_test, 4)

    tables = work / f"attribution-n{n_patients}-s{seed}" / args.groups_from / "tables"
    groups = pd.read_parquet(tables / "faithfulness_per_stay.parquet").set_index("stay_id")
    g = groups.reindex(man["stay_id"].to_numpy()[test])
    label = g["single_factor_group"].fillna("").to_numpy(str)
    single = np.char.startswith(label, "single_factor")
    carrier = np.where(np.char.find(label, "cardiac") >= 0, MODS.index("ecg"), MODS.index("cxr"))
    top = np.abs(phi).argmax(1)
    observer_lo = g["observer_log_odds"].to_numpy(float)  # the observer's game, full coalition
    obs_ehr = g["observer_shapley_ehr"].to_numpy(float)
    ehr = has[test, 0]
    return {
        "seed": seed,
        "n_train": int(len(train)),
        "n_single_factor": int(single.sum()),
        "single_factor_top1": float((top == carrier)[single].mean()) if single.any() else None,
        "full_log_odds_sd_vs_observer": float(np.std(values[(1,) * len(MODS)] - observer_lo)),
        "ehr_shapley_sd_vs_observer": float(np.std((phi[:, 0] - obs_ehr)[ehr])),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.faithfulness_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work", default="runs/bq2", help="bench_quality's work folder")
    p.add_argument("--n-patients", type=int, default=20000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dropout", type=float, default=0.3, help="MCAR rate of the extra copies")
    p.add_argument("--copies", type=int, default=5, help="extra train copies with MCAR masks")
    p.add_argument("--groups-from", default="concat", help="head whose saved groups are read")
    add_common_args(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    seeds = [one_seed(Path(args.work), args.n_patients, s, args) for s in args.seeds]
    report = {
        "benchmark": "faithfulness_floor",
        "environment": environment(),
        "what": "a learner given exactly what each shown modality reveals, trained on the same "
        "train-split labels: its single-factor top-1 against the ideal observer",
        "target": 0.90,
        "seeds": seeds,
        "single_factor_top1_mean": float(np.mean(top1))
        if (top1 := [s["single_factor_top1"] for s in seeds if s["single_factor_top1"] is not None])
        else None,
    }
    return finish(report, args.out)


if __name__ == "__main__":
    main()
