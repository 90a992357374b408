"""The table-level half of preprocessing: cohort, EHR arrays, and which files belong to each stay.

Everything here reads tables (streamed where large) in the parent process; decoding the images and
waveforms that the plan points to happens shard by shard in :mod:`clinical_moe.data.cache`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.config import Config, split_seed
from clinical_moe.data import damage
from clinical_moe.data.table_io import quiet_tables
from clinical_moe.data.tables import read_optional

logger = logging.getLogger(__name__)

# issue 15: what an unusable optional CSV index becomes (no rows: the modality pairs nothing).
_CXR_EMPTY = {
    "dicom_id": "string",
    "subject_id": "Int64",
    "study_id": "Int64",
    "ViewPosition": "string",
    "study_datetime": "datetime64[ns]",
    "path": "string",
}
_ECG_EMPTY = {
    "subject_id": "Int64",
    "study_id": "Int64",
    "file_name": "string",
    "ecg_time": "datetime64[ns]",
    "path": "string",
}

RELEASES = {"ehr": "mimic-iv", "cxr": "mimic-cxr", "ecg": "mimic-iv-ecg", "notes": "mimic-iv-note"}


@dataclass
class StayPlan:
    """What preprocessing will write, stay by stay.

    Attributes:
        stays: The cohort (one row per stay, sorted by stay_id).
        label_columns: Label columns of the task.
        ehr: stay_id -> raw EHR arrays (values, obs_mask, times, static) for stays with events.
        cxr / ecg: stay_id -> [(absolute file path, hours since intime)], oldest first.
        targets: modality -> stay_id -> float32 ``(n, K_m)`` native targets of those events, row
            for row (NaN = unknown); only for modalities whose label file was read.
        target_names: modality -> target names (the K_m columns), same keys as ``targets``.
        notes: stay_id -> (token ids (n, L) int32, hours (n,)) of the notes before prediction time.
        embedded: modality -> stay_id -> (vectors (n, F), hours (n,)[, targets (n, K)]) for the
            modalities read from ``data.embeddings`` (their cxr / ecg / notes dicts are empty).
        num_variables / num_static: EHR widths V and S.
        summary: Counts for the preprocessing summary (no patient text).
    """

    stays: pd.DataFrame
    label_columns: list[str]
    ehr: dict[int, dict] = field(default_factory=dict)
    cxr: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    ecg: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    notes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    targets: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    target_names: dict[str, list[str]] = field(default_factory=dict)
    embedded: dict[str, dict[int, tuple]] = field(default_factory=dict)
    num_variables: int = 0
    num_static: int = 0
    summary: dict = field(default_factory=dict)

    def meta(self, part: pd.DataFrame) -> list[dict]:
        """Manifest fields of the stays in ``part``."""
        cols = ["stay_id", "subject_id", "hadm_id", "split", *self.label_columns]
        out = part[cols].copy()
        for c in ("stay_id", "subject_id", "hadm_id"):
            out[c] = out[c].astype("int64")
        for c in self.label_columns:
            out[c] = out[c].astype("float32")
        return out.to_dict("records")


def _events_by_stay(
    pairs: pd.DataFrame | None, root: Path, targets: np.ndarray | None = None
) -> tuple[dict[int, list[tuple[str, float]]], dict[int, np.ndarray]]:
    """Group paired events by stay (oldest first), with their target rows in the same order.

    Args:
        pairs: Output of a ``pair_*`` function.
        root: The release folder the relative paths start from.
        targets: float32 ``(len(pairs), K)`` aligned with ``pairs``' rows, or None.

    Returns:
        ``(events, targets)``: stay_id -> [(path, hours)] and stay_id -> ``(n, K)`` (empty when
        ``targets`` is None).
    """
    if pairs is None or pairs.empty:
        return {}, {}
    pairs = pairs.reset_index(drop=True).sort_values(["stay_id", "hours"], kind="stable")
    order = pairs.index.to_numpy()  # row of each sorted event in the input
    paths = [str(root / p) for p in pairs["path"].astype(str)]
    out: dict[int, list[tuple[str, float]]] = {}
    rows: dict[int, list[int]] = {}
    for i, sid, path, hours in zip(
        order, pairs["stay_id"].astype(int), paths, pairs["hours"].astype(float)
    ):
        out.setdefault(int(sid), []).append((path, hours))
        rows.setdefault(int(sid), []).append(int(i))
    if targets is None:
        return out, {}
    return out, {sid: targets[idx] for sid, idx in rows.items()}  # (n, K) per stay


def _release(root: Path, modality: str) -> Path | None:
    path = root / RELEASES[modality]
    if not path.is_dir():
        warnings.warn(
            f"{path} not found: modality {modality!r} will be missing for every stay", stacklevel=3
        )
        return None
    return path


def plan_stays(cfg: Config, quiet: bool = False) -> StayPlan:
    """Build the cohort and collect each stay's EHR arrays, files and note tokens."""
    from clinical_moe.data.cohort import OBSERVATION_TASKS, build_cohort, exclude_unobserved
    from clinical_moe.data.ehr import static_features, time_series
    from clinical_moe.data.ehr_variables import SOURCES

    d = cfg.data
    log = damage.start()  # issue 15: missing sources / damaged rows of this pass, for the summary
    root = Path(d.root)
    mimic_iv = root / RELEASES["ehr"]
    if not mimic_iv.is_dir():
        raise FileNotFoundError(
            f"MIMIC-IV root not found: {mimic_iv} (data.root = {root}); write a synthetic corpus "
            f"there with `clinical-moe synth --out {root}`, or set data.root=<your MIMIC folder>"
        )
    modalities = set(d.modalities)
    note_ids: dict[int, list[str]] = {}
    # With EHR in the run, its one pass over the event tables also decides the cohort's
    # "observation in the window" rule, instead of build_cohort scanning them a second time.
    one_pass = "ehr" in modalities and d.task in OBSERVATION_TASKS
    cohort = build_cohort(
        mimic_iv,
        task=d.task,
        seed=split_seed(cfg),
        split_fractions=d.split_fractions,
        prediction_hours=d.window_hours,
        variables=d.variables_file,
        check_observations=not one_pass,
    )
    events = None
    if "ehr" in modalities:  # issue 13: the tables are read once per release, not per task
        from clinical_moe.data.decode_store import store_root
        from clinical_moe.data.ehr_store import ehr_store_dir, ensure_ehr_store, windowed_events

        with quiet_tables(quiet):
            where = ehr_store_dir(store_root(d), mimic_iv, d.variables_file, d.window_hours)
            ehr_store = ensure_ehr_store(mimic_iv, where, d.variables_file, d.window_hours)
        events = windowed_events(ehr_store, cohort, d.window_hours, d.variables_file)
    if one_pass:
        no_tables = len(events.missing_sources) == len(SOURCES)
        observed = None if no_tables else events.window_stays
        cohort = exclude_unobserved(cohort, observed, d.window_hours, root=mimic_iv)
    cohort = cohort.sort_values("stay_id", kind="stable").reset_index(drop=True)
    label_columns = list(cohort.attrs.get("label_columns", ["label"]))
    plan = StayPlan(cohort, label_columns)
    summary: dict = {
        "task": d.task,
        "data_root": str(root.resolve()),  # lets evaluation find a synthetic corpus's truth/
        "modalities": list(d.modalities),
        "label_columns": label_columns,
        "cohort_exclusions": dict(cohort.attrs.get("exclusions", {})),
        "label_prevalence": {c: float(cohort[c].mean()) for c in label_columns},
        # modality-native per-event targets (filled by clinical_moe.data.targets when read)
        "targets": {},
        "target_kinds": {},
        "target_stats": {},
        "target_counts": {},
    }

    # EHR time series + static features
    static = static_features(cohort)
    plan.num_static = static.shape[1]
    if events is not None:
        series = time_series(events, cohort["stay_id"].astype(int))
        plan.num_variables = len(events.variables)
        static_arr = np.nan_to_num(static.to_numpy(np.float32))
        static_arr[:, 0] = static_arr[:, 0] / 100.0  # age in centuries (the store standardises)
        row_of = {int(s): i for i, s in enumerate(static.index)}
        for sid, ts in series.items():
            if len(ts.times):
                plan.ehr[sid] = {
                    "values": ts.values,
                    "obs_mask": ts.obs_mask,
                    "times": ts.times,
                    "static": static_arr[row_of[sid]],
                }
        summary["ehr"] = {
            "variables": list(events.variables),
            "dropped_values": events.dropped,
            "missing_sources": list(events.missing_sources),
            "stays_without_events": int(len(cohort) - len(plan.ehr)),
        }

    if "cxr" in modalities and (cxr_root := _release(root, "cxr")) is not None:
        from clinical_moe.data.cxr import pair_cxr, read_cxr_metadata

        pairs = pair_cxr(
            cohort,
            read_optional("mimic-cxr/metadata", read_cxr_metadata, cxr_root, empty=_CXR_EMPTY),
            window_hours=d.window_hours,
            view_positions=d.cxr_view_positions,
            keep="last_n",
            n=d.max_events,
        )
        targets = None
        if d.native_targets:
            from clinical_moe.data.event_targets import cxr_event_targets

            targets = cxr_event_targets(pairs, cxr_root, cohort, d, summary)
        plan.cxr, by_stay = _events_by_stay(pairs, cxr_root, targets)
        if targets is not None:
            plan.targets["cxr"] = by_stay
        summary["cxr"] = {"paired_images": int(len(pairs)), "stays": len(plan.cxr)}

    if "ecg" in modalities and (ecg_root := _release(root, "ecg")) is not None:
        from clinical_moe.data.ecg import pair_ecg, read_record_list

        pairs = pair_ecg(
            cohort,
            read_optional("mimic-iv-ecg/record_list", read_record_list, ecg_root, empty=_ECG_EMPTY),
            window_hours=d.window_hours,
            keep="last_n",
            n=d.max_events,
        )
        targets = None
        if d.native_targets:
            from clinical_moe.data.event_targets import ecg_event_targets

            targets = ecg_event_targets(pairs, ecg_root, cohort, summary)
        plan.ecg, by_stay = _events_by_stay(pairs, ecg_root, targets)
        if targets is not None:
            plan.targets["ecg"] = by_stay
        summary["ecg"] = {"paired_records": int(len(pairs)), "stays": len(plan.ecg)}

    if "notes" in modalities and (note_root := _release(root, "notes")) is not None:
        from clinical_moe.data.fingerprint import hf_notes_path

        plan.notes, summary["notes"], note_ids = _plan_notes(
            cohort, note_root, d, hf_notes_path(cfg)
        )

    plan.target_names = {m: summary["targets"][m] for m in plan.targets}
    summary["encoder_kwargs"] = {
        "ehr": {"num_variables": plan.num_variables, "num_static": plan.num_static},
        "notes": {"vocab_size": summary.get("notes", {}).get("vocab_size", d.note_vocab)},
    }
    summary.update(log.finish(plan, d.modalities))  # issue 15: damage ledger + empty modalities
    if d.embeddings:  # issue 13: precomputed vectors stand in for these modalities' files
        from clinical_moe.data.embeddings import embed_events

        wanted = {m: p for m, p in d.embeddings.items() if m in modalities}
        embed_events(plan, wanted, note_ids, summary)
    plan.summary = summary
    return plan


def _plan_notes(
    cohort: pd.DataFrame, note_root: Path, d, hf_path: str | None = None
) -> tuple[dict, dict, dict]:
    """Pair notes before prediction time, fit the tokenizer on train notes, tokenise.

    Returns ``(notes, summary, note_ids)``: note_ids are stay_id -> note ids, row for row.

    With ``hf_path`` (a Hugging Face notes backbone) the model's own tokenizer is used instead
    of the package's word-level one (issue 13), so the ids mean what the model's embeddings mean.
    """
    from clinical_moe.data.notes import NoteTokenizer, load_notes, pair_notes

    notes = load_notes(note_root, subject_ids=cohort["subject_id"].astype(int))
    paired = pair_notes(cohort, notes, prediction_hours=d.window_hours, max_notes=d.max_events)
    split_of = dict(zip(cohort["stay_id"].astype(int), cohort["split"]))
    is_train = paired["stay_id"].astype(int).map(split_of).eq("train").to_numpy()
    if hf_path:
        from clinical_moe.data.hf_tokenizer import HFNoteTokenizer

        tok = HFNoteTokenizer(hf_path, max_len=d.note_max_len)
    else:
        tok = NoteTokenizer(max_vocab=d.note_vocab, max_len=d.note_max_len)
    tok.fit(paired.loc[is_train, "text"])
    note_id = paired["note_id"].astype(str).to_numpy()
    stored: dict[str, int] = {}
    if hf_path:  # the model's ids depend on the note alone: tokenized once, into the store
        from clinical_moe.data.decode_store import store_root
        from clinical_moe.data.note_store import tokenize_with_store

        ids, stored = tokenize_with_store(tok, paired["text"].tolist(), note_id, store_root(d))
    else:  # a vocabulary fitted on this task's train split: its ids belong to this cache
        ids, _ = tok.transform_padded(paired["text"])  # (n_notes, L)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    stay_ids = paired["stay_id"].astype(int).to_numpy()
    hours = paired["hours"].astype(float).to_numpy()
    by_stay: dict[int, list[str]] = {}
    for sid, sel in pd.Series(stay_ids).groupby(stay_ids).indices.items():
        out[int(sid)] = (ids[sel].astype(np.int32), hours[sel].astype(np.float32))  # (n, L), (n,)
        by_stay[int(sid)] = note_id[sel].tolist()
    summary = {
        "paired_notes": int(len(paired)),
        "stays": len(out),
        "excluded": dict(paired.attrs.get("exclusions", {})),
        "vocab_size": len(tok.vocab_),
        "train_notes": int(is_train.sum()),
        "tokenizer": f"hf:{tok.identity_}" if hf_path else "word-level",
        **({"store": stored} if stored else {}),
    }
    return out, summary, by_stay
