"""Figures of an evaluation (matplotlib, Agg backend: no display needed).

- :func:`metric_vs_rate`: a metric against the simulated missing rate, one panel per mechanism,
  one line per run with its bootstrap 95% CI band, the ceiling of each rate's masks (what an
  observer of the shown modalities can reach; synthetic data) as a solid black line and the
  oracle (true risk) dashed;
- :func:`pattern_heatmap`: modality patterns x runs (fixed patterns, or natural combinations);
  a row resting on few stays or positives is marked ``!`` and hatched (unreliable).

The reports caption each figure (:func:`clinical_moe.evaluation.report.captions`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, works headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "f1": "F1 (val threshold)",
    "ece": "ECE",
    "brier": "Brier",
}
MECHANISM_TITLES = {
    "mcar": "MCAR",
    "mar": "MAR (covariate)",
    "mnar": "MNAR (label)",
    "mnar_content": "MNAR (content)",
}


def metric_vs_rate(
    grid: pd.DataFrame, path: str | Path, metric: str = "auroc", oracle: float | None = None
) -> Path | None:
    """Plot ``metric`` vs missing rate per mechanism; returns the file or None (no rate points)."""
    df = grid[(grid["metric"] == metric) & ~grid["mechanism"].isin(["natural", "pattern"])]
    if df.empty:
        return None
    mechs = list(dict.fromkeys(df["mechanism"]))
    runs = list(dict.fromkeys(grid["run"]))
    fig, axes = plt.subplots(
        1, len(mechs), figsize=(4.2 * len(mechs), 3.6), sharey=True, squeeze=False
    )
    colors = plt.get_cmap("tab10")
    for ax, mech in zip(axes[0], mechs):
        for i, run in enumerate(runs):
            d = df[(df["mechanism"] == mech) & (df["run"] == run)].sort_values("rate")
            ax.plot(d["rate"], d["value"], marker="o", ms=3, color=colors(i % 10), label=run)
            ax.fill_between(
                d["rate"], d["ci_low"], d["ci_high"], color=colors(i % 10), alpha=0.15, linewidth=0
            )
        if metric == "auroc" and "ceiling_auroc" in df and df["ceiling_auroc"].notna().any():
            c = df[df["mechanism"] == mech].drop_duplicates("rate").sort_values("rate")
            ax.plot(c["rate"], c["ceiling_auroc"], "k-", lw=1.2, label="ceiling (observer)")
        if oracle is not None and np.isfinite(oracle):
            ax.axhline(oracle, color="k", ls="--", lw=1, label="oracle (true risk)")
        if metric == "auroc":
            ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_title(MECHANISM_TITLES.get(mech, mech))
        ax.set_xlabel("simulated missing rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(LABELS.get(metric, metric))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _few(n, n_pos, min_n: int = 50, min_class: int = 10) -> bool:
    """Whether a cell rests on fewer than ``min_n`` stays or ``min_class`` positives/negatives."""
    if pd.isna(n):
        return False
    if pd.isna(n_pos):
        return n < min_n
    return bool(n < min_n or min(n_pos, n - n_pos) < min_class)


def pattern_heatmap(
    table: pd.DataFrame,
    path: str | Path,
    metric: str = "auroc",
    title: str = "AUROC by modality pattern",
) -> Path | None:
    """Heatmap of ``metric`` for patterns (rows) x runs (columns), annotated with the values.

    Patterns go down the rows so that their labels stay horizontal and readable however many
    there are; a pattern resting on few stays or positives is labelled ``!`` in red and hatched.

    Args:
        table: Tidy rows with ``run``, ``pattern``, ``metric``, ``value``, ``n`` (and ``n_pos``).
        path: PNG file to write.
        metric: Which metric.
        title: Figure title.
    """
    df = table[(table["metric"] == metric) & table["pattern"].notna()]
    if df.empty:
        return None
    patterns = list(dict.fromkeys(df["pattern"]))
    runs = list(dict.fromkeys(df["run"]))
    values = df.pivot_table(
        index="pattern", columns="run", values="value", aggfunc="first", dropna=False
    ).reindex(index=patterns, columns=runs)
    first = df.drop_duplicates("pattern").set_index("pattern").reindex(patterns)
    counts = first["n"]
    pos = first["n_pos"] if "n_pos" in first else pd.Series(np.nan, index=patterns)
    few = [_few(n, k) for n, k in zip(counts, pos)]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(runs) + 4.0), 0.32 * len(patterns) + 1.6))
    data = np.ma.masked_invalid(values.to_numpy(dtype=float))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    lo = 0.5 if metric == "auroc" else float(np.nanmin(values.to_numpy(dtype=float), initial=0.0))
    if metric == "auroc" and data.count():
        lo = min(lo, float(data.min()))  # show below-chance cells too
    hi = 1.0 if metric == "auroc" else None
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=lo, vmax=hi)
    mid = (lo + (hi if hi is not None else float(data.max() if data.count() else 1.0))) / 2
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = values.iat[i, j]
            ax.text(
                j,
                i,
                "n/a" if not np.isfinite(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if np.isfinite(v) and v < mid else "black",
            )
    for i, flag in enumerate(few):
        if flag:  # hatch the unreliable rows
            ax.add_patch(
                plt.Rectangle(
                    (-0.5, i - 0.5), len(runs), 1, fill=False, hatch="//", ec="red", lw=0, alpha=0.4
                )
            )
    ax.set_yticks(
        range(len(patterns)),
        [f"{p} (n={int(c)}{' !' if f else ''})" for p, c, f in zip(patterns, counts, few)],
        fontsize=8,
    )
    for label, flag in zip(ax.get_yticklabels(), few):
        if flag:
            label.set_color("#b00000")
    ax.set_xticks(range(len(runs)), runs, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(
        title + ("\n(! hatched = few stays or positives: unreliable)" if any(few) else ""),
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, label=LABELS.get(metric, metric))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
