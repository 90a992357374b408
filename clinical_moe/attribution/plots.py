"""Figures of the attribution report (matplotlib's object API: no pyplot, no global backend).

Every function takes the tables of :func:`clinical_moe.attribution.tables.attribute_dataset`
and returns a :class:`matplotlib.figure.Figure`, or None when there is nothing to draw (e.g.
routing heatmaps of a head without routing). Figures are not registered with pyplot, so building
them neither needs a display nor changes a notebook's backend: save them with ``fig.savefig`` or
show them in a notebook with ``display(fig)``. Only numbers, modality names, missingness patterns
and stay ids are drawn; nothing a patient wrote or was written about them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MIN_STAYS = 50  # rows of fewer stays are marked "!" (unreliable), as in the reports


def _n_label(name, n) -> str:
    """``"ehr+cxr (n=4 !)"``: a row label with its stay count, ``!`` when it is small."""
    return f"{name} (n={int(n)}{' !' if int(n) < MIN_STAYS else ''})"


LABELS = {
    "shapley": "Shapley (log-odds)",
    "ig": "Integrated Gradients (log-odds)",
    "ablation": "drop-one ablation (risk)",
}


def _heatmap(
    ax,
    data: pd.DataFrame,
    title: str,
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    center: bool = False,
) -> None:
    values = data.to_numpy(float)
    kw = {}
    if center and np.isfinite(values).any():
        lim = float(np.nanmax(np.abs(values))) or 1.0
        kw = {"vmin": -lim, "vmax": lim}
    im = ax.imshow(values, aspect="auto", cmap=cmap, **kw)
    ax.set_xticks(range(data.shape[1]), [str(c) for c in data.columns], rotation=45, ha="right")
    ax.set_yticks(range(data.shape[0]), [str(i) for i in data.index])
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    fmt.format(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if not center else "k",
                )
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def importance_figure(summary: pd.DataFrame):
    """Mean |attribution| per modality (over stays that have it), one panel per method."""
    methods = [m for m in LABELS if m in set(summary["method"])]
    fig = Figure(figsize=(4.2 * len(methods), 3.4))
    axes = fig.subplots(1, len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = summary[summary["method"] == method]
        ax.bar(part["modality"], part["mean_abs"], color="tab:blue", label="stays with it")
        ax.bar(
            part["modality"],
            part["mean_abs_all"],
            color="tab:orange",
            alpha=0.7,
            width=0.5,
            label="all stays (absent = 0)",
        )
        ax.set_title(f"mean |{LABELS[method]}|", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pattern_figure(patterns: pd.DataFrame, method: str = "shapley", modalities=None):
    """Heatmap pattern x modality of the mean signed attribution of ``method``."""
    part = patterns[patterns["method"] == method]
    if part.empty:
        return None
    grid = part.pivot(index="pattern", columns="modality", values="mean")
    if modalities is not None:
        grid = grid.reindex(columns=[m for m in modalities if m in grid.columns])
    n = part.groupby("pattern")["n_stays"].first()
    grid.index = [_n_label(p, n[p]) for p in grid.index]
    fig = Figure(figsize=(6, 0.45 * len(grid) + 1.8))
    ax = fig.subplots()
    _heatmap(ax, grid, f"mean {LABELS[method]} by missingness pattern", cmap="RdBu_r", center=True)
    fig.tight_layout()
    return fig


def routing_figures(by_modality: pd.DataFrame, by_pattern: pd.DataFrame) -> dict:
    """One figure per MoE layer: router probability by (modality, status) and by pattern."""
    figs = {}
    for layer in sorted(set(by_modality["layer"])):
        mod = by_modality[by_modality["layer"] == layer].copy()
        mod["group"] = mod["modality"] + " / " + mod["status"]
        g1 = mod.pivot(index="group", columns="expert", values="mean_prob")
        pat = by_pattern[by_pattern["layer"] == layer]
        g2 = pat.pivot(index="pattern", columns="expert", values="mean_prob")
        if "n_stays" in pat:
            n = pat.groupby("pattern")["n_stays"].first()
            g2.index = [_n_label(p, n[p]) for p in g2.index]
        fig = Figure(figsize=(12, 0.4 * max(len(g1), len(g2)) + 2.2))
        axes = fig.subplots(1, 2)
        _heatmap(axes[0], g1, f"layer {layer}: mean router probability by modality")
        _heatmap(axes[1], g2, f"layer {layer}: by missingness pattern (observed tokens)")
        for ax in axes:
            ax.set_xlabel("expert")
        fig.tight_layout()
        figs[f"routing_layer{layer}"] = fig
    return figs


def interaction_figure(summary: pd.DataFrame):
    """I2MoE mean interaction weights per missingness pattern (and over all stays)."""
    if summary.empty or "group" not in summary:
        return None
    grid = summary.set_index("group").drop(columns=["n_stays"])
    grid.index = [_n_label(g, n) for g, n in zip(grid.index, summary["n_stays"])]
    fig = Figure(figsize=(7, 0.45 * len(grid) + 1.8))
    ax = fig.subplots()
    _heatmap(ax, grid, "I2MoE mean interaction weights (U_m over stays that have m)")
    fig.tight_layout()
    return fig


def faithfulness_figure(
    faith: pd.DataFrame, per_stay: pd.DataFrame, truth: pd.DataFrame, modalities
):
    """Ranking figures per group with 95% CIs, chance and oracle; true effect vs Shapley.

    Left: one point per method and figure (top-1 signed, top-1 by |.|, share of |.|), with its
    bootstrap CI as a bar, chance as a black dash and what the true effects reach (oracle) as a
    red cross; the x labels give the group and its number of stays. Right: every (stay, present
    modality) pair, true effect against its Shapley value.
    """
    rank = faith[faith["group"].isin(["cardiac_only", "pulmonary_only", "synergy"])]
    rank = rank[~rank["metric"].str.startswith("synergy_weight")]
    if rank.empty or truth.empty:
        return None
    fig = Figure(figsize=(13, 4.4))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    metrics = list(dict.fromkeys(rank["metric"]))
    methods = list(dict.fromkeys(rank["method"]))
    width = 0.8 / max(len(methods), 1)
    x0 = np.arange(len(metrics))
    for k, method in enumerate(methods):
        part = rank[rank["method"] == method].set_index("metric").reindex(metrics)
        xs = x0 + (k - (len(methods) - 1) / 2) * width
        err = np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        axes[0].errorbar(
            xs, part["value"], yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, label=method
        )
    first = rank.drop_duplicates("metric").set_index("metric").reindex(metrics)
    axes[0].scatter(x0, first["chance"], marker="_", s=300, color="k", label="chance", zorder=3)
    axes[0].scatter(x0, first["oracle"], marker="x", s=30, color="r", label="oracle", zorder=3)
    labels = [
        f"{m.replace('_', ' ')}\n(n={int(n)}{'!' if n < 50 else ''})"
        for m, n in zip(metrics, first["n_stays"])
    ]
    axes[0].set_xticks(x0, labels, fontsize=6, rotation=60, ha="right")
    axes[0].set_ylim(-0.02, 1.05)
    axes[0].set_ylabel("share of the group's stays (or of |attribution|)")
    axes[0].set_title("carrying modality ranked first, with 95% bootstrap CIs", fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    df = per_stay.merge(truth, on="stay_id")
    for m in modalities:
        sel = df[f"has_{m}"].astype(bool)
        axes[1].scatter(df.loc[sel, f"true_{m}"], df.loc[sel, f"shapley_{m}"], s=6, label=m)
    rho = faith[(faith["method"] == "shapley") & (faith["metric"] == "spearman_pooled")]["value"]
    axes[1].set_title(
        f"true effect vs Shapley (Spearman {float(rho.iloc[0]):.2f})"
        if len(rho)
        else "true effect vs Shapley",
        fontsize=10,
    )
    axes[1].set_xlabel("true effect (log-odds)")
    axes[1].set_ylabel("Shapley value (log-odds)")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].axvline(0, color="grey", lw=0.5)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def synergy_figure(faith: pd.DataFrame):
    """I2MoE synergy weight: synergy-driven vs other stays and their difference, with 95% CIs."""
    rows = faith[faith["metric"].str.startswith("synergy_weight")].set_index("metric")
    if rows.empty:
        return None
    fig = Figure(figsize=(7, 3))
    axes = fig.subplots(1, 2)
    names = [m for m in ("synergy_weight_pulm_x_inf", "synergy_weight_other") if m in rows.index]
    for ax, keys, title in (
        (axes[0], names, "mean synergy weight"),
        (axes[1], ["synergy_weight_difference"], "difference (should be > 0)"),
    ):
        part = rows.reindex(keys)
        err = np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        ax.errorbar(np.arange(len(keys)), part["value"], yerr=np.nan_to_num(err), fmt="o")
        ax.set_xticks(
            np.arange(len(keys)),
            [
                f"{k.removeprefix('synergy_weight_')}\n(n={int(n)})"
                for k, n in zip(keys, part["n_stays"])
            ],
            fontsize=8,
        )
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_title(title, fontsize=10)
    axes[1].axhline(0, color="grey", lw=0.8)
    fig.tight_layout()
    return fig


def stay_figure(per_stay: pd.DataFrame, stay_id: int, modalities):
    """Bar chart of one stay's Shapley values and IG per modality (drill-down)."""
    row = per_stay[per_stay["stay_id"] == stay_id]
    if row.empty:
        raise KeyError(f"stay {stay_id} is not in the attributed stays")
    row = row.iloc[0]
    x = np.arange(len(modalities))
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.bar(x - 0.2, [row[f"shapley_{m}"] for m in modalities], 0.4, label="Shapley")
    ax.bar(x + 0.2, [row[f"ig_{m}"] for m in modalities], 0.4, label="IG")
    ax.set_xticks(x, [m if row[f"has_{m}"] else f"{m}\n(absent)" for m in modalities])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("log-odds")
    ax.set_title(
        f"stay {stay_id}: risk {row['risk']:.3f} (prevalence "
        f"{1 / (1 + np.exp(-row['base_log_odds'])):.3f})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ecg_occlusion_figure(occlusion: np.ndarray, leads, stay_id: int):
    """Heatmap lead x time window of one stay's ECG occlusion (change in log-odds)."""
    n = occlusion.shape[1]
    grid = pd.DataFrame(occlusion, index=list(leads), columns=[f"{k + 1}/{n}" for k in range(n)])
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    _heatmap(
        ax,
        grid,
        f"stay {stay_id}: ECG occlusion (log-odds drop when flattened)",
        fmt="{:.3f}",
        cmap="RdBu_r",
        center=True,
    )
    ax.set_xlabel("time window")
    fig.tight_layout()
    return fig
