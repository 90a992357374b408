"""Write the attribution tables (CSV + Parquet), figures (PNG) and a self-contained HTML report.

The HTML embeds its figures as base64 PNGs, so one file can be archived or attached to an MLflow
run. It names stays by stay id only and holds numbers, modality names and missingness patterns:
no patient free text ever reaches it (ARCHITECTURE.md, privacy convention). Each figure has a
caption that says what it shows and how to read it, and every row or figure resting on few stays
or few positives carries a visible "unreliable" note (:func:`~clinical_moe.evaluation.report.
small_n_note`, the rule of the evaluation report).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from clinical_moe.attribution import plots
from clinical_moe.attribution.agreement import COALITION_GROUP, GROUP
from clinical_moe.evaluation.report import SMALL_N_RULE, small_n_note

_CSS = """body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}td,th{border:1px solid #ccc;
padding:2px 6px;text-align:right}th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}
.note{color:#555;font-size:13px;max-width:950px}img{max-width:100%;height:auto}
.tw{overflow-x:auto;max-width:100%}figure{margin:1em 0}
figcaption{font-size:13px;color:#444;max-width:950px;margin-top:.3em}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:.5em .8em;max-width:950px}
td.caution{color:#b00000;font-weight:bold;text-align:left}"""

CAPTIONS = {
    "importance": "How much each modality moves the prediction, one panel per method. Blue: mean "
    "|attribution| over the stays that have the modality (its typical effect when present); "
    "orange: the same over all stays, absent ones counting 0 (its overall weight in this test "
    "split, lower for rarely observed modalities). Taller = the modality matters more; the "
    "y units differ between panels (log-odds for Shapley and IG, risk for ablation), so compare "
    "modalities within a panel, not heights across panels.",
    "patterns": "Mean signed Shapley value (log-odds) of each modality (columns) for the stays of "
    "each missingness pattern (rows, with their number of stays). Red = the modality pushed the "
    "risk up on average, blue = down, white = no effect; blank = the modality is absent in that "
    "pattern. A modality whose colour changes between patterns is used differently depending on "
    "what else is observed. ! marks patterns with few stays or positives: unreliable.",
    "interactions": "I2MoE's mean interaction weights (columns: the uniqueness experts U_m, the "
    "synergy and the redundancy expert) for the stays of each missingness pattern (rows, with "
    "their number of stays). Each row sums to 1 over the experts a stay can use. By default "
    "U_m reads only modality m, so its weight says how much the mixture leans on that modality's "
    "own prediction; a large synergy weight says the head relies on modalities together.",
}

ROUTING_TEXT = """<p class="note"><b>How to read.</b> A mixture-of-experts layer sends each token
(a piece of one modality's encoding) to a few of its experts; the router gives every token a
probability per expert. Left heatmap: the mean router probability per expert (columns) for the
tokens of each modality (rows), split into <i>observed</i> tokens (real data) and <i>filled</i>
tokens (positions the head filled through its missing-modality path); each row sums to 1. Right:
the same for the observed tokens of the stays of each missingness pattern. Uniform rows (every
value near 1 / number of experts) mean the router does not tell modalities apart; a row with one
bright cell means the modality has its own expert. The table gives per layer the normalised mutual
information between a token's top expert and its modality (<i>nmi_modality</i>) or its stay's
pattern (<i>nmi_pattern</i>): 0 = experts ignore it, 1 = the expert is determined by it; and
<i>load_entropy</i>: 1 = all experts used equally, near 0 = most tokens go to one expert
(collapse).</p>"""


METHODS_TEXT = """<p class="note">All methods explain the log-odds of the target
({target}). <b>Shapley</b>: exact modality Shapley values over all coalitions of the stay's
modalities, a removed modality taking the head's own missing-modality path; v(empty) = log-odds of
the training prevalence ({prev:.3f}); per stay they sum to the model's log-odds minus v(empty).
<b>IG</b>: Integrated Gradients (Sundararajan et al. 2017) over the encoders' output tokens,
summed per modality, baseline = zero tokens (masks kept). <b>Ablation</b>: change in predicted
risk when one modality is dropped (positive = the modality raised the risk); not defined for a
stay's only modality. Absent modalities get 0 (Shapley, IG).</p>"""


FAITH_TEXT = """<p class="note"><b>How to read.</b> Each group holds stays whose risk the
synthetic truth says one modality (or the CXR + EHR pair) should explain; the definitions used, and
the number of stays, are in the first table (n &lt; 50 is flagged: read the CI, not the point).
Per method and group: <i>top1_signed</i> = share of stays whose carrying modality has the largest
signed attribution among the present modalities (a modality can "win" it because the others are
negative); <i>top1_abs</i> = the same by |attribution|; <i>share</i> = mean share of the carrying
modality (pair) in the total |attribution|; for the synergy group <i>top2</i> asks that CXR and EHR
take the first two places (stays with at least three modalities). [ci_low, ci_high] is a 95%
percentile bootstrap CI over the group's stays (seeded). <i>chance</i> = what a random ranking (an
even split of |attribution|) gives; <i>oracle</i> = what the true per-modality effects give under
the same figure: it is the reachable level, below 1 where the truth itself ranks another modality
first (e.g. a pulmonary-only stay's ECG carries the negative effect of cardiac = 0). A faithful
attribution sits near the oracle, well above chance. <b>One run:</b> the CIs cover the stays, not
the training. Models of the same AUROC trained with another seed can share a stay's risk between
modalities differently (on the 20,000-patient benchmark one run's single-factor top-1 moved by up to
0.21 with the model seed); before calling one head more faithful than another, compare several
seeds on one split (<code>seed=1 data.split_seed=0</code>, ...).</p>"""

FAITH_FIGURE_TEXT = """<p class="note"><b>Figure.</b> Left: each point is one method's figure for
one group, its bar the 95% bootstrap CI; the black dash is chance, the red cross the oracle; x
labels give the group's n (! = fewer than 50 stays). Right: one point per (stay, present modality),
the true effect of the generative model (log-odds, centred on the corpus mean) against the
modality's Shapley value; a faithful attribution lies along a rising line.</p>"""

SYNERGY_TEXT = """<p class="note"><b>I2MoE synergy weight.</b> Mean weight of the synergy expert on
synergy-driven stays (pulmonary = infection = 1) against the other stays that also have CXR and EHR
(same modalities, so the renormalisation over present modalities does not enter), and the
difference with a two-sample 95% bootstrap CI. The synergy expert is used where the interaction
acts when the difference's CI lies above 0.</p>"""

PROBE_TEXT = """<p class="note"><b>Encoder probes.</b> For each modality, a standardised logistic
regression fitted on the masked-mean pooled output of its encoder (train stays that have the
modality) predicts the latent factor the modality carries (CXR: pulmonary; ECG: cardiac; EHR:
infection and severity above the train median; notes: severity above the median); AUROC on the
evaluated split's stays with a 95% stratified bootstrap CI. 0.5 = the encoder's output says nothing
linearly readable about the factor; near 1 = it is decoded. n_train / n_test are the stays used
(capped, seeded draw).</p>"""


def save_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> list[Path]:
    """Write every table as ``<name>.csv`` and ``<name>.parquet``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, df in tables.items():
        df = df.reset_index(drop=True)
        df.to_csv(folder / f"{name}.csv", index=False)
        df.to_parquet(folder / f"{name}.parquet", index=False)
        files += [folder / f"{name}.csv", folder / f"{name}.parquet"]
    return files


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def make_figures(tables: dict[str, pd.DataFrame], modalities) -> dict[str, bytes]:
    """PNG bytes of every figure that applies to these tables."""
    figs = {
        "importance": plots.importance_figure(tables["modality_summary"]),
        "patterns": plots.pattern_figure(tables["pattern_summary"], modalities=modalities),
    }
    figs.update(plots.routing_figures(tables["routing_by_modality"], tables["routing_by_pattern"]))
    figs["interactions"] = plots.interaction_figure(tables["interaction_summary"])
    truth = tables.get("faithfulness_per_stay", pd.DataFrame())
    if "faithfulness" in tables and not truth.empty:
        figs["faithfulness"] = plots.faithfulness_figure(
            tables["faithfulness"],
            tables["per_stay"],
            truth[["stay_id", *[f"true_{m}" for m in modalities]]],
            modalities,
        )
    if "faithfulness" in tables:
        figs["synergy"] = plots.synergy_figure(tables["faithfulness"])
    return {k: _png(f) for k, f in figs.items() if f is not None}


def _table(df: pd.DataFrame, max_rows: int = 60) -> str:
    return df.head(max_rows).to_html(
        index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0
    )


def _img(png: bytes | None, alt: str, caption: str | None = None) -> str:
    """An embedded PNG, inside a ``<figure>`` with ``caption`` (plain text) when given."""
    if png is None:
        return ""
    data = base64.b64encode(png).decode()
    alt = caption or alt
    img = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
    if caption is None:
        return img
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _cautioned(df: pd.DataFrame, n_col: str, positives: pd.Series | None = None) -> pd.DataFrame:
    """``df`` with a ``caution`` column ("n=4, 1 positive: unreliable") from ``n_col``."""
    pos = positives if positives is not None else [None] * len(df)
    return df.assign(caution=[small_n_note(n, k) for n, k in zip(df[n_col], pos)])


def _positives(per_stay: pd.DataFrame, key: pd.Series) -> pd.Series:
    """Positives among the stays, for each value of ``key`` (a per-stay grouping)."""
    y = pd.to_numeric(per_stay["label"], errors="coerce")
    return y.groupby(key.to_numpy()).sum()


def _html_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    """:func:`_table` in a horizontally scrolling box, caution cells highlighted."""
    out = _table(df, max_rows).replace("<td>n=", '<td class="caution">n=')
    return f'<div class="tw">{out}</div>'


def small_n_warning(per_stay: pd.DataFrame) -> str:
    """A visible warning paragraph when the attributed split is small, else ""."""
    y = pd.to_numeric(per_stay["label"], errors="coerce")
    note = small_n_note(len(per_stay), int(y.sum()) if y.notna().all() else None)
    if not note:
        return ""
    return (
        f'<p class="warn"><b>Warning.</b> Only {len(per_stay)} stays were attributed ({note}): '
        "the means, rankings and CIs below rest on few stays and can change completely on "
        "another sample. Attribute a larger split before drawing conclusions.</p>"
    )


def high_risk_stays(per_stay: pd.DataFrame, modalities, n: int = 10) -> pd.DataFrame:
    """The ``n`` stays with the highest predicted risk: stay id, risk, label, pattern, Shapley."""
    cols = ["stay_id", "risk", "label", "pattern", *[f"shapley_{m}" for m in modalities]]
    return per_stay.sort_values("risk", ascending=False, kind="stable").head(n)[cols]


AGREEMENT_TEXT = """<p class="note"><b>Agreement with the observer.</b> Each modality's
attributions against the ideal observer's, over every stay that has the modality: <b>bias</b> (mean
of head minus observer, with its 95% CI), <b>slope</b> (1 = calibrated, below 1 = the modality's
evidence under-used), <b>r</b>, the <b>residual SD</b> (the noise that decides near ties in the
top-1 figures) and, for the EHR, the residual's slope in <b>age</b> per 15 years (0 when the head
uses age as the truth does). When the single-factor target fails, this says which modality is
off. The observer plays the head's own game: a modality outside the coalition is read the way the
head was trained to read a missing one (naturally absent, or hidden by the run's
<code>train.modality_dropout</code>).</p>"""


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method and modality from the ``observer_agreement`` rows."""
    parts = rows["metric"].str.extract(r"^agreement_(?P<modality>[^_]+)_(?P<figure>.+)$")
    t = rows.assign(**parts)
    wide = t.pivot_table(
        index=["method", "modality"], columns="figure", values="value", aggfunc="first"
    )
    bias = t[t["figure"] == "bias"].set_index(["method", "modality"])
    wide["bias_ci_low"], wide["bias_ci_high"] = bias["ci_low"], bias["ci_high"]
    wide["n_stays"] = bias["n_stays"]
    order = ["bias", "bias_ci_low", "bias_ci_high", "slope", "r", "resid_sd", "age_slope"]
    cols = [c for c in order if c in wide]
    out = wide[cols].astype(float).round(3) + 0.0  # (+ 0.0: no "-0" after rounding)
    out["n_stays"] = wide["n_stays"].astype(int)
    out.columns.name = None
    out = out.reset_index()
    out.insert(2, "unit", ["risk" if m == "ablation" else "log-odds" for m in out["method"]])
    return out


COALITION_TEXT = """<p>The Shapley values above are built from coalition values: the head's
log-odds when it sees only some of a stay's modalities, through its own missing-modality path.
This table compares each with the ideal observer's (head minus observer, log-odds; mean with 95%
CI and SD), over every stay that has the coalition and over the single-factor stays. A coalition
with a large bias is a missing-modality path the head has learned wrong; on near-tie stays a bias
of 0.1-0.2 is enough to change which modality comes first. The caution column is about the
single-factor columns.</p>"""


def coalition_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per coalition from the ``coalition_agreement`` rows (all and single-factor stays)."""
    parts = rows["metric"].str.extract(
        r"^coalition_(?P<stays>all|single_factor)_(?P<coalition>.+)_(?P<figure>bias|resid_sd)$"
    )
    t = rows.assign(**parts)
    out = pd.DataFrame(index=pd.Index(t["coalition"].unique(), name="coalition"))
    for stays in ("all", "single_factor"):
        s = t[t["stays"] == stays]
        bias = s[s["figure"] == "bias"].set_index("coalition")
        sd = s[s["figure"] == "resid_sd"].set_index("coalition")
        out[f"{stays}_bias"] = bias["value"]
        out[f"{stays}_ci_low"], out[f"{stays}_ci_high"] = bias["ci_low"], bias["ci_high"]
        out[f"{stays}_sd"] = sd["value"]
        out[f"{stays}_n"] = bias["n_stays"]
    figures = [c for c in out if not c.endswith("_n")]
    out[figures] = out[figures].astype(float).round(3) + 0.0
    for c in ("all_n", "single_factor_n"):
        out[c] = out[c].astype("Int64")
    size = np.array([c.count("+") for c in out.index])
    return out.iloc[np.argsort(size, kind="stable")].reset_index()  # singles first, then pairs


def faithfulness_html(tables: dict[str, pd.DataFrame], figures: dict[str, bytes]) -> list[str]:
    """HTML parts of the faithfulness, synergy and encoder probe sections, with captions."""
    faith = tables["faithfulness"]
    parts = ["<h2>Faithfulness against the synthetic truth</h2>"]
    probe = tables.get("encoder_probe")
    probe_parts = []
    if probe is not None and not probe.empty:
        probe_parts = [
            "<h2>Encoder probes</h2>",
            PROBE_TEXT,
            _html_table(_cautioned(probe, "n_test")),
        ]
    if "status" in set(faith["metric"]):
        return [*parts, _html_table(faith), *probe_parts]
    groups = tables.get("faithfulness_groups")
    parts.append(FAITH_TEXT)
    if groups is not None and not groups.empty:
        parts += ["<h3>Groups (definitions as used)</h3>", _html_table(groups)]
    parts += [
        FAITH_FIGURE_TEXT,
        _img(
            figures.get("faithfulness"),
            "faithfulness",
            "Faithfulness of each method per group against chance and the oracle (left), and "
            "Shapley values against the true effects (right); see the text above.",
        ),
    ]
    agree = faith["group"] == GROUP
    coal = faith["group"] == COALITION_GROUP
    rank = faith[~faith["metric"].str.startswith("synergy_weight") & ~agree & ~coal]
    parts += ["<h3>Ranking figures with 95% CIs</h3>", _html_table(rank, max_rows=200)]
    if agree.any():
        parts += [
            "<h3>Agreement with the ideal observer, per modality</h3>",
            AGREEMENT_TEXT,
            _html_table(agreement_table(faith[agree])),
        ]
    if coal.any():
        table = _cautioned(coalition_table(faith[coal]), "single_factor_n")
        for c in ("all_n", "single_factor_n"):  # no stays in the group: a dash, as the figures
            table[c] = table[c].astype(object).where(table[c].notna(), "–")
        parts += [
            "<h3>Coalition values against the ideal observer</h3>",
            COALITION_TEXT,
            _html_table(table),
        ]
    syn = faith[faith["metric"].str.startswith("synergy_weight")]
    if not syn.empty:
        parts += [
            "<h3>I2MoE synergy weight</h3>",
            SYNERGY_TEXT,
            _img(
                figures.get("synergy"),
                "synergy",
                "Mean synergy-expert weight on synergy-driven stays and on the other stays with "
                "CXR and EHR, with their difference and its 95% CI (see the text above).",
            ),
            _html_table(syn),
        ]
    return parts + probe_parts


def write_html(
    path: str | Path,
    tables: dict[str, pd.DataFrame],
    figures: dict[str, bytes],
    info: dict,
    modalities,
) -> Path:
    """The self-contained HTML report (see the module docstring)."""
    path = Path(path)
    esc = html.escape
    prev = float(info.get("prevalence", float("nan")))
    per = tables["per_stay"]
    summary = tables["modality_summary"]
    y = pd.to_numeric(per["label"], errors="coerce")
    has_pos = {m: y[per[f"has_{m}"].astype(bool)].sum() for m in modalities if f"has_{m}" in per}
    mod_pos = pd.Series([has_pos.get(m) for m in summary["modality"]])
    pat = tables["pattern_summary"][tables["pattern_summary"]["method"] == "shapley"]
    pat_pos = _positives(per, per["pattern"])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Attribution report "
        f"{esc(str(info.get('run', '')))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Modality attributions: {esc(str(info.get('run', '')))}</h1>",
        small_n_warning(per),
        _html_table(pd.DataFrame({"key": list(info), "value": [str(v) for v in info.values()]})),
        METHODS_TEXT.format(target=esc(str(info.get("target", ""))), prev=prev),
        f'<p class="note">{esc(SMALL_N_RULE)}</p>',
        "<h2>Mean |attribution| per modality</h2>",
        _img(figures.get("importance"), "importance", CAPTIONS["importance"]),
        _html_table(_cautioned(summary, "n_present", mod_pos)),
        "<h2>By missingness pattern</h2>",
        _img(figures.get("patterns"), "patterns", CAPTIONS["patterns"]),
        _html_table(_cautioned(pat, "n_stays", pat["pattern"].map(pat_pos))),
    ]
    routing = [k for k in sorted(figures) if k.startswith("routing_layer")]
    parts.append("<h2>Routing</h2>")
    if routing:
        parts.append(ROUTING_TEXT)
        parts += [
            _img(
                figures[k],
                k,
                f"Router probabilities of MoE layer {k.removeprefix('routing_layer')}: by "
                "modality and token status (left), by missingness pattern (right, rows with "
                "their number of stays; ! = few stays: unreliable).",
            )
            for k in routing
        ]
        parts.append(_html_table(tables["routing_specialisation"]))
    else:
        parts.append(
            "<p class='note'>This head has no token router "
            "(no router probabilities in its gates).</p>"
        )
    if not tables["interaction_summary"].empty:
        parts += [
            "<h2>I2MoE interaction weights</h2>",
            _img(figures.get("interactions"), "interactions", CAPTIONS["interactions"]),
            _html_table(_cautioned(tables["interaction_summary"], "n_stays")),
        ]
    parts += faithfulness_html(tables, figures)
    parts += [
        "<h2>Highest-risk stays (by stay id)</h2>",
        '<p class="note">The test stays with the highest predicted risk, their label, the '
        "modalities they have and each modality's Shapley value (log-odds; 0 = absent).</p>",
        _html_table(high_risk_stays(tables["per_stay"], modalities)),
        "</body></html>",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_report(
    out: str | Path, tables: dict[str, pd.DataFrame], info: dict, modalities
) -> dict[str, Path]:
    """Tables, figures and ``report.html`` under ``out``; returns their locations."""
    out = Path(out)
    save_tables(tables, out / "tables")
    figures = make_figures(tables, modalities)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    report = write_html(out / "report.html", tables, figures, info, modalities)
    return {"tables": out / "tables", "figures": out / "figures", "report": report}
