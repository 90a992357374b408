"""The right answers, kept apart from what loaders read: ``truth/stays``, ``truth/studies``,
``truth/effects.json``.

``truth/stays.csv.gz`` has one row per ICU stay: the latent factors, the true risk
p(death | latents, age), the observed risk (the ceiling: E[true risk | what the stay's present
modalities reveal, and which are present], see :mod:`.ceiling`), the labels, cohort flags and which modalities the stay has inside the
pairing window. It depends on the plan only, so :func:`sample_truth` reproduces it without
rendering anything.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinical_moe.data.synthetic.config import SynthConfig
from clinical_moe.data.synthetic.plan import ShardPlan, plan_shard
from clinical_moe.data.synthetic.timeutil import fmt_datetime

STAY_COLUMNS = [
    "subject_id",
    "hadm_id",
    "stay_id",
    "intime",
    "outtime",
    "los",
    "age",
    "severity",
    "cardiac",
    "pulmonary",
    "infection",
    "true_risk",
    "observed_risk",
    "label_mortality",
    "label_los3",
    "label_los7",
    "in_root_cohort",
    "in_ihm48",
    "exclusion",
    "has_ehr",
    "has_cxr",
    "has_ecg",
    "has_notes",
    "n_cxr",
    "n_ecg",
    "n_notes",
]
STUDY_COLUMNS = [
    "modality",
    "study_id",
    "dicom_id",
    "note_id",
    "subject_id",
    "hadm_id",
    "stay_id",
    "time",
    "in_window",
    "view",
    "bits_stored",
    "photometric",
    "has_window",
    "opacity",
    "effusion",
    "devices",
    "st",
    "wide_qrs",
    "af",
    "hr",
    "band",  # radiology reports: severity band of the indication (0 mild, 1 moderate, 2 critical)
    "mentions_opacity",  # chest reports: the text names the opacity
    "mentions_effusion",  # chest reports: the text names the effusion
]


def stays_truth(plan: ShardPlan) -> pd.DataFrame:
    """Per-stay truth rows of one shard (see module docstring); times as MIMIC strings."""
    counts: dict[tuple[int, str], int] = {}
    carries = {"cxr": ("cxr", "notes"), "ecg": ("ecg",), "rr": ("notes",)}  # a CXR has a report
    for ev in plan.events:
        if ev["in_window"]:
            for k in carries[ev["kind"]]:
                counts[(ev["stay_id"], k)] = counts.get((ev["stay_id"], k), 0) + 1
    rows = []
    for s in plan.stays:
        child = s["age"] < 18
        transfer = s["first_careunit"] != s["last_careunit"]
        multi = s["n_icu_in_admission"] > 1
        reasons = [
            r
            for r, on in (("child", child), ("transfer", transfer), ("multiple_icu_stays", multi))
            if on
        ]
        root = not reasons
        n = {k: counts.get((s["stay_id"], k), 0) for k in ("cxr", "ecg", "notes")}
        rows.append(
            {
                "subject_id": s["subject_id"],
                "hadm_id": s["hadm_id"],
                "stay_id": s["stay_id"],
                "intime": s["intime"],
                "outtime": s["outtime"],
                "los": s["los"],
                "age": s["age"],
                "severity": s["severity"],
                "cardiac": s["cardiac"],
                "pulmonary": s["pulmonary"],
                "infection": s["infection"],
                "true_risk": s["true_risk"],
                "label_mortality": int(s["died"]),
                "label_los3": int(s["los"] > 3),
                "label_los7": int(s["los"] > 7),
                "in_root_cohort": int(root),
                "in_ihm48": int(root and s["los"] >= 2.0),
                "exclusion": ";".join(reasons) or None,
                "has_ehr": 1,
                "has_cxr": int(n["cxr"] > 0),
                "has_ecg": int(n["ecg"] > 0),
                "has_notes": int(n["notes"] > 0),
                "n_cxr": n["cxr"],
                "n_ecg": n["ecg"],
                "n_notes": n["notes"],
            }
        )
    df = pd.DataFrame(rows, columns=STAY_COLUMNS)
    df["intime"] = fmt_datetime(df["intime"].tolist())
    df["outtime"] = fmt_datetime(df["outtime"].tolist())
    return df


def studies_truth(rows: list[dict]) -> pd.DataFrame:
    """Per-study truth rows (CXR images, ECGs, radiology notes) with what each one shows."""
    df = pd.DataFrame(rows, columns=STUDY_COLUMNS)
    for c in ("study_id", "hadm_id", "stay_id", "bits_stored", "band"):
        df[c] = pd.array([None if v is None or v != v else int(v) for v in df[c]], dtype="Int64")
    df["time"] = fmt_datetime(df["time"].tolist())
    return df


def sample_truth(n_patients: int, seed: int, **config) -> pd.DataFrame:
    """Per-stay truth of the corpus ``generate_corpus`` would write, without writing any file.

    Fast (no images, signals or tables): a few thousand patients per second. Use it to study the
    generative story (e.g. the oracle AUROC) at sizes where writing the corpus would be slow.

    Args:
        n_patients: number of patients.
        seed: master seed.
        **config: other :class:`SynthConfig` fields (those that change the plan: ``shard_size``,
            ``window_hours``).

    Returns:
        The ``truth/stays`` table. Its ``observed_risk`` uses stand-in draws of the per-study and
        per-report channels (nothing is rendered), so it equals a written corpus's in
        distribution only.
    """
    cfg = SynthConfig(n_patients=n_patients, seed=seed, **config)
    cfg.validate()
    from clinical_moe.data.synthetic.observer import add_observed_risk

    stays = [stays_truth(plan_shard(cfg, k)) for k in range(cfg.n_shards())]
    return add_observed_risk(pd.concat(stays, ignore_index=True))


def oracle_auroc(stays: pd.DataFrame, cohort: str | None = "in_ihm48") -> float:
    """AUROC of the true risk against the mortality labels (over ``cohort`` rows if given)."""
    from sklearn.metrics import roc_auc_score

    df = stays if cohort is None else stays[stays[cohort] == 1]
    y = df["label_mortality"].to_numpy()
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, df["true_risk"].to_numpy()))
