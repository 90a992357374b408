"""The evaluation grid: every run x (mechanism x rate, fixed pattern) on identical masks.

:func:`evaluate_runs` is the whole evaluation of issue #6 in one call:

1. check that the runs score the same test split (same manifest rows; else a clear error);
2. read the split's covariates once and draw every mask of the grid from them and the seed
   (masks depend on stay ids and data, never on a model);
3. per run: pick the F1 threshold on the validation split (natural missingness), then predict the
   test split under every distinct mask (encoders once per batch);
4. score every point with AUROC, AUPRC, F1 (validation threshold), ECE and Brier with stratified
   percentile-bootstrap 95% CIs (the same resamples for every run at a point: paired intervals),
   plus the natural-missingness breakdown per observed modality combination and, on a synthetic
   corpus, the **ceiling** (the posterior risk given what the point's mask leaves shown, see
   :mod:`clinical_moe.data.synthetic.ceiling`; AUROC / ceiling is the headline) and the oracle
   (true risk, a second reference no observer can reach) on the same stays;
5. write tables, plots and reports to ``out_dir`` (see :mod:`clinical_moe.evaluation.report`).

Same inputs give the same numbers: models run in eval mode without gradients, masks and
bootstrap resamples come from the seed alone.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from clinical_moe.config import EvalConfig
from clinical_moe.evaluation.ceiling import ceiling_table
from clinical_moe.evaluation.context import EvalContext, build_context, load_truth
from clinical_moe.evaluation.inference import predict_under_masks
from clinical_moe.evaluation.paired import PAIRED_COLUMNS, paired_auroc_rows
from clinical_moe.metrics import EVAL_METRICS, best_threshold, prevalence, score_with_ci
from clinical_moe.missingness import MissingnessSpec, grid_specs, pattern_name

log = logging.getLogger(__name__)

GRID_COLUMNS = [
    "run",
    "run_id",
    "head",
    "point",
    "mechanism",
    "rate",
    "pattern",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "auroc_over_ceiling",
    "ceiling_auroc",
    "auroc_over_oracle",
    "oracle_auroc",
    "n",
    "n_pos",
    "prevalence",
    "n_excluded",
    "kept_fraction",
    "mean_modalities",
]


class IncomparableRunsError(ValueError):
    """The runs do not score the same test stays, so identical masks are impossible."""


@dataclass
class GridResult:
    """Everything :func:`evaluate_runs` computed (the grid table is also its return value).

    Attributes:
        grid: Tidy table, one row per run x point x metric (:data:`GRID_COLUMNS`).
        natural: Tidy table per run x natural modality combination x metric.
        runs: One row per run: name, id, head, validation threshold and scores.
        oracle: One row per metric of the true risk on the test stays (empty on real data).
        ceiling: One row per point: the ceiling's and the oracle's AUROC on the point's scored
            stays and how exact the ceiling is (empty on real data).
        masks: Long table of every distinct mask: point, stay_id, ``has_<modality>``.
        meta: Seeds, settings, split hash, timings.
        paired: One row per point x pair of runs: AUROC difference with a paired bootstrap CI
            (:mod:`clinical_moe.evaluation.paired`; empty with one run).
    """

    grid: pd.DataFrame
    natural: pd.DataFrame
    runs: pd.DataFrame
    oracle: pd.DataFrame
    masks: pd.DataFrame
    meta: dict
    ceiling: pd.DataFrame = field(default_factory=pd.DataFrame)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)


def _point_seed(seed: int, rows: np.ndarray) -> list[int]:
    """Bootstrap seed of a set of scored stays: shared by every run (paired resamples).

    It depends on which stays are scored only, so points whose masks coincide (a rate of 0 and
    the natural point) report identical intervals, and every run is resampled identically.
    """
    return [int(seed), zlib.crc32(np.packbits(np.asarray(rows, dtype=bool)).tobytes())]


def _unique_names(runs) -> list[str]:
    names = [r.name for r in runs]
    out = []
    for r, name in zip(runs, names):
        if names.count(name) > 1:
            name = f"{name}-{(r.run_id or str(r.checkpoint))[-6:]}"
        out.append(name)
    if len(set(out)) < len(out):  # the same run twice
        out = [f"{n}#{i}" for i, n in enumerate(out)]
    return out


def check_comparable(runs) -> tuple[object, str]:
    """The shared test split of ``runs`` and its hash; raise if they differ in any way that matters.

    Raises:
        IncomparableRunsError: no test split, different test stays / labels / natural presence
            (different caches), or different modality lists.
    """
    from clinical_moe.evaluation.context import split_hash

    if not runs:
        raise ValueError("evaluate_runs needs at least one run")
    first = runs[0]
    if first.data.test is None:
        raise IncomparableRunsError(f"run {first.name}: its cache has no test split")
    ref_hash = split_hash(first.data.test)
    for r in runs[1:]:
        if r.data.test is None:
            raise IncomparableRunsError(f"run {r.name}: its cache has no test split")
        if tuple(r.data.test.modalities) != tuple(first.data.test.modalities):
            raise IncomparableRunsError(
                f"runs {first.name} and {r.name} use different modalities "
                f"({first.data.test.modalities} vs {r.data.test.modalities}); masks over different "
                "modality sets cannot be identical - evaluate them separately"
            )
        h = split_hash(r.data.test)
        if h != ref_hash:
            raise IncomparableRunsError(
                f"runs {first.name} and {r.name} were trained on different caches: their test "
                f"splits differ (manifest hash {ref_hash[:12]} at {first.cfg.data.cache_dir} vs "
                f"{h[:12]} at {r.cfg.data.cache_dir}); evaluate them separately"
            )
        if r.data.task != first.data.task:
            raise IncomparableRunsError(f"runs {first.name} and {r.name} have different tasks")
    return first.data.test, ref_hash


def _masks(specs: Sequence[MissingnessSpec], ctx: EvalContext, cfg: EvalConfig, seed: int):
    """Every point's mask, deduplicated: ``(bool[K, N, M], point -> index into K)``."""
    sim = ctx.simulator_context(cfg.mar_covariate, cfg.strength)
    unique: dict[bytes, int] = {}
    arrays, index = [], {}
    for spec in specs:
        mask = spec.apply(ctx.present, seed, **sim)
        key = np.packbits(mask).tobytes()
        if key not in unique:
            unique[key] = len(arrays)
            arrays.append(mask)
        index[spec.label] = unique[key]
    return np.stack(arrays), index


def _score_rows(y, p, task, threshold, cfg: EvalConfig, seed) -> dict:
    return score_with_ci(
        y, p, task, threshold, n_boot=cfg.bootstrap, seed=seed, n_bins=cfg.ece_bins
    )


def _records(base: dict, scores: dict, refs: dict | None = None) -> list[dict]:
    """Tidy rows of one run at one point; ``refs`` (ceiling / oracle AUROC) go on the AUROC row."""
    out = [{**base, "metric": m, **scores[m]} for m in EVAL_METRICS if m in scores]
    for row in out:
        if row["metric"] == "auroc" and refs:
            v = row["value"]
            for name in ("ceiling", "oracle"):
                ref = refs.get(f"{name}_auroc", math.nan)
                row[f"{name}_auroc"] = ref
                row[f"auroc_over_{name}"] = v / ref if ref and math.isfinite(ref) else math.nan
    return out


def _threshold_json(t) -> str:
    if t is None:
        return "argmax"
    if np.ndim(t) == 0:
        return f"{float(t):.6g}"
    return json.dumps(np.round(np.atleast_1d(np.asarray(t, dtype=float)), 6).tolist())


def evaluate_runs(
    runs: list,
    eval_cfg: EvalConfig | None = None,
    out_dir: str | Path | None = None,
    seed: int | None = None,
    quiet: bool = True,
    device: str = "cpu",
    write: bool = True,
) -> pd.DataFrame:
    """Score several trained runs under simulated missingness on identical masks.

    Args:
        runs: :class:`~clinical_moe.runs.LoadedRun` s trained on the same cache.
        eval_cfg: Grid settings; None uses the first run's ``eval`` config section.
        out_dir: Where tables, plots and reports go (nothing is written when None).
        seed: Overrides ``eval_cfg.seed`` (masks and bootstrap resamples).
        quiet: No progress bar.
        device: Where the models run.
        write: Write the outputs to ``out_dir`` (tables only are returned otherwise).

    Returns:
        The tidy grid table (:data:`GRID_COLUMNS`); ``attrs`` hold ``out_dir``, the oracle
        AUROC and ``ceiling_auroc`` (point -> ceiling AUROC; empty on real data). The other tables are written to ``out_dir``; :func:`run_grid` returns them all.
    """
    result = run_grid(runs, eval_cfg, seed=seed, quiet=quiet, device=device)
    grid = result.grid
    if out_dir is not None and write:
        from clinical_moe.evaluation.report import write_outputs

        write_outputs(result, Path(out_dir))
        grid.attrs["out_dir"] = str(out_dir)
    oracle = result.oracle
    auroc = oracle.loc[oracle["metric"] == "auroc", "value"] if len(oracle) else []
    grid.attrs["oracle_auroc"] = float(auroc.iloc[0]) if len(auroc) else math.nan
    ceil = result.ceiling
    grid.attrs["ceiling_auroc"] = (
        dict(zip(ceil["point"], ceil["ceiling_auroc"])) if len(ceil) else {}
    )
    return grid


def run_grid(
    runs: list,
    eval_cfg: EvalConfig | None = None,
    seed: int | None = None,
    quiet: bool = True,
    device: str = "cpu",
) -> GridResult:
    """Compute every table of the evaluation (see :func:`evaluate_runs`), writing nothing."""
    t0 = time.perf_counter()
    if eval_cfg is not None:
        cfg = eval_cfg
    else:
        cfg = runs[0].cfg.eval if runs else EvalConfig()
    seed = cfg.seed if seed is None else int(seed)
    test, test_hash = check_comparable(runs)
    task = runs[0].data.task
    names = _unique_names(runs)
    mods = tuple(test.modalities)
    total = sum(len(r.data.val) + len(test) for r in runs) + len(test)
    bar = tqdm(total=total, desc="evaluate", unit="stay", disable=quiet or not sys.stderr.isatty())

    ctx = build_context(test, cfg.batch_size)
    bar.update(len(test))
    specs = grid_specs(cfg.mechanisms, cfg.rates, mods, cfg.patterns)
    masks, index = _masks(specs, ctx, cfg, seed)
    y_all = ctx.labels
    ceiling, refs, ceiling_note = ceiling_table(specs, masks, index, ctx, cfg, test, seed)
    timings = {"context_and_masks_s": time.perf_counter() - t0}

    run_rows, records, natural_records, paired_records = [], [], [], []
    probs_by_run = []
    for run, name in zip(runs, names):
        t_run = time.perf_counter()
        val = run.data.val
        p_val = predict_under_masks(
            run.model, val, val.present[None], task, cfg.batch_size, device, bar.update
        )[0]
        y_val = val.labels[:, 0] if val.labels.shape[1] == 1 else val.labels
        thr = best_threshold(y_val, p_val, task)
        val_scores = score_with_ci(y_val, p_val, task, thr, n_boot=0, metrics=("auroc", "f1"))
        probs = predict_under_masks(
            run.model, test, masks, task, cfg.batch_size, device, bar.update
        )
        probs_by_run.append((run, name, thr, probs))
        run_rows.append(
            {
                "run": name,
                "run_id": run.run_id,
                "head": run.cfg.model.name,
                "threshold": _threshold_json(thr),
                "val_auroc": val_scores["auroc"]["value"],
                "val_f1": val_scores["f1"]["value"],
                "n_val": len(val),
                "n_test": len(test),
            }
        )
        timings[f"predict_s/{name}"] = time.perf_counter() - t_run
    bar.close()

    t_score = time.perf_counter()
    natural = ctx.present
    for spec in specs:
        mask = masks[index[spec.label]]
        rows = mask.any(1)
        y = y_all[rows]
        base = {
            "point": spec.label,
            "mechanism": spec.mechanism,
            "rate": math.nan if spec.mechanism == "pattern" else spec.rate,
            "pattern": pattern_name(spec.pattern) if spec.pattern else None,
            "n": int(rows.sum()),
            "n_pos": int(np.sum(y)) if task != "multiclass" else None,
            "prevalence": prevalence(y, task),
            "n_excluded": int((~rows).sum()),
            "kept_fraction": float(mask.sum() / max(1, natural.sum())),
            "mean_modalities": float(mask[rows].sum(1).mean()) if rows.any() else math.nan,
        }
        for run, name, thr, probs in probs_by_run:
            scores = _score_rows(
                y, probs[index[spec.label]][rows], task, thr, cfg, _point_seed(seed, rows)
            )
            records += _records(
                {"run": name, "run_id": run.run_id, "head": run.cfg.model.name, **base},
                scores,
                refs.get(spec.label),
            )
        if len(probs_by_run) > 1:  # paired AUROC differences on the same resamples
            paired_records += paired_auroc_rows(
                spec.label,
                y,
                {name: probs[index[spec.label]][rows] for _, name, _, probs in probs_by_run},
                task,
                cfg.bootstrap,
                _point_seed(seed, rows),
            )

    # natural missingness, per observed combination of modalities
    combos = np.array(
        [pattern_name([m for m, on in zip(mods, row) if on]) or "(none)" for row in natural]
    )
    nat_k = index["natural"]
    for combo in sorted(set(combos), key=lambda c: (c.count("+"), c)):
        rows = combos == combo
        y = y_all[rows]
        base = {
            "pattern": combo,
            "n": int(rows.sum()),
            "n_pos": int(np.sum(y)) if task != "multiclass" else None,
            "prevalence": prevalence(y, task),
        }
        for run, name, thr, probs in probs_by_run:
            scores = _score_rows(y, probs[nat_k][rows], task, thr, cfg, _point_seed(seed, rows))
            natural_records += _records(
                {"run": name, "run_id": run.run_id, "head": run.cfg.model.name, **base}, scores
            )

    oracle_rows = []
    truth, note = load_truth(test)
    if truth is not None and task == "binary":
        risk = (
            pd.Series(ctx.ids)
            .map(dict(zip(truth["stay_id"], truth["true_risk"])))
            .to_numpy(dtype=float)
        )
        ok = np.isfinite(risk)
        scores = score_with_ci(
            y_all[ok],
            risk[ok],
            task,
            0.5,
            n_boot=cfg.bootstrap,
            seed=_point_seed(seed, ok),
            n_bins=cfg.ece_bins,
            metrics=("auroc", "auprc", "brier", "ece"),
        )
        oracle_rows = [
            {"metric": m, **v, "n": int(ok.sum()), "source": note} for m, v in scores.items()
        ]
    elif truth is not None:
        note = f"no oracle for a {task} task"
    timings["score_s"] = time.perf_counter() - t_score

    mask_frames, seen = [], set()
    for label, k in index.items():
        if k in seen:
            continue  # one copy of each distinct mask, under its first point
        seen.add(k)
        frame = pd.DataFrame(masks[k], columns=[f"has_{m}" for m in mods])
        frame.insert(0, "stay_id", ctx.ids)
        frame.insert(0, "point", label)
        mask_frames.append(frame)
    meta = {
        "eval_config": asdict(cfg),
        "seed": seed,
        "task": task,
        "modalities": list(mods),
        "test_split_sha256": test_hash,
        "n_test": len(test),
        "points": [s.label for s in specs],
        "distinct_masks": len(masks),
        "runs": names,
        "oracle": note,
        "ceiling": ceiling_note,
        "checkpoints": {n: str(r.checkpoint) for n, r in zip(names, runs)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return GridResult(
        grid=pd.DataFrame(records, columns=GRID_COLUMNS),
        natural=pd.DataFrame(natural_records),
        runs=pd.DataFrame(run_rows),
        oracle=pd.DataFrame(oracle_rows),
        masks=pd.concat(mask_frames, ignore_index=True),
        meta=meta,
        ceiling=ceiling,
        paired=pd.DataFrame(paired_records, columns=PAIRED_COLUMNS),
    )
