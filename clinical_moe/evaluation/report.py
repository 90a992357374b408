"""Write an evaluation to disk: tidy tables (CSV + Parquet), PNG plots, Markdown and HTML reports.

Layout of ``out_dir``::

    grid.csv / grid.parquet          run x point x metric (value, 95% CI, n, prevalence, ...)
    natural.csv / natural.parquet    run x natural modality combination x metric
    runs.csv                         run, id, head, validation threshold and scores
    oracle.csv                       true-risk scores on the same test stays (synthetic data only)
    ceiling.csv                      per point: ceiling and oracle AUROC (synthetic data only)
    paired.csv                       per point x pair of runs: AUROC difference, paired 95% CI
    masks.parquet                    every distinct mask: point, stay_id, has_<modality>
    meta.json                        settings, seeds, test split hash, timings
    auroc_vs_rate.png  patterns.png  natural_patterns.png
    summary.md  report.html          the HTML embeds the PNGs (one self-contained file)

Every figure has a caption saying what it shows and how to read it; every table row and heatmap
column resting on few stays or few positives carries a visible "unreliable" note
(:func:`small_n_note`). Only stay ids, counts and scores are written: never any free text of a
patient.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd

from clinical_moe.evaluation.plots import LABELS, metric_vs_rate, pattern_heatmap

TABLES = ("grid", "natural")
MIN_STAYS = 50  # below this many scored stays a figure is flagged unreliable
MIN_CLASS = 10  # ... or below this many positives (or negatives)


def small_n_note(n, n_pos=None) -> str:
    """``"n=14, 3 positives: unreliable"`` where a figure rests on few stays or positives, else "".

    Args:
        n: Scored stays.
        n_pos: Positives among them (None for a multiclass task: only ``n`` is checked).
    """
    if n is None or pd.isna(n):
        return ""
    n = int(n)
    if n_pos is None or pd.isna(n_pos):
        return f"n={n}: unreliable" if n < MIN_STAYS else ""
    n_pos = int(n_pos)
    if n < MIN_STAYS or min(n_pos, n - n_pos) < MIN_CLASS:
        return f"n={n}, {n_pos} positive{'s' if n_pos != 1 else ''}: unreliable"
    return ""


SMALL_N_RULE = (
    f"Rows marked unreliable rest on fewer than {MIN_STAYS} stays or fewer than {MIN_CLASS} "
    "positives (or negatives): their point values can be 1.000 or 0.000 by chance and their "
    "intervals are too narrow to trust (a bootstrap cannot see outcomes the few stays never had)."
)


def _fmt(v: float, ci_low: float = math.nan, ci_high: float = math.nan) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if math.isfinite(ci_low) and math.isfinite(ci_high):
        return f"{v:.3f} [{ci_low:.3f}, {ci_high:.3f}]"
    return f"{v:.3f}"


def summary_table(
    grid: pd.DataFrame, metric: str = "auroc", points: list[str] | None = None
) -> pd.DataFrame:
    """``metric`` with CI as text, points (rows) x runs (columns), for the reports."""
    df = grid[grid["metric"] == metric]
    if points is not None:
        df = df[df["point"].isin(points)]
    df = df.assign(
        text=[_fmt(v, lo, hi) for v, lo, hi in zip(df["value"], df["ci_low"], df["ci_high"])]
    )
    order = list(dict.fromkeys(df["point"]))
    table = df.pivot_table(index="point", columns="run", values="text", aggfunc="first")
    table = table.reindex(index=order, columns=list(dict.fromkeys(df["run"])))
    first = df.drop_duplicates("point").set_index("point").reindex(order)
    table.insert(0, "n", first["n"].astype(int))
    n_pos = first["n_pos"] if "n_pos" in first else pd.Series(None, index=order)
    if n_pos.notna().any():
        table.insert(1, "positives", n_pos.astype("Int64"))
    table["caution"] = [small_n_note(n, k) for n, k in zip(first["n"], n_pos)]
    table.columns.name = None
    return table


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (index included)."""
    cols = [df.index.name or "", *map(str, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def _points_of_interest(grid: pd.DataFrame) -> list[str]:
    """natural, each mechanism at its highest rate and at the rate nearest 0.5."""
    pts = ["natural"]
    rated = grid[~grid["mechanism"].isin(["natural", "pattern"])]
    for _, d in rated.groupby("mechanism", sort=False):
        rates = sorted(set(d["rate"]))
        for r in (min(rates, key=lambda x: abs(x - 0.5)), rates[-1]):
            label = d.loc[d["rate"] == r, "point"].iloc[0]
            if label not in pts:
                pts.append(label)
    return pts


def _signed(v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:+.3f}"
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"


def paired_table(paired: pd.DataFrame, points: list[str] | None = None) -> pd.DataFrame:
    """Paired AUROC differences as text: points (rows) x "a − b" (columns), with n and cautions."""
    if paired is None or not len(paired):
        return pd.DataFrame()
    df = paired if points is None else paired[paired["point"].isin(points)]
    df = df.assign(
        pair=[f"{a} − {b}" for a, b in zip(df["run_a"], df["run_b"])],
        text=[_signed(v, lo, hi) for v, lo, hi in zip(df["diff"], df["ci_low"], df["ci_high"])],
    )
    order = list(dict.fromkeys(df["point"]))
    table = df.pivot_table(index="point", columns="pair", values="text", aggfunc="first")
    table = table.reindex(index=order, columns=list(dict.fromkeys(df["pair"])))
    first = df.drop_duplicates("point").set_index("point").reindex(order)
    table.insert(0, "n", first["n"].astype(int))
    if first["n_pos"].notna().any():
        table.insert(1, "positives", first["n_pos"].astype("Int64"))
    table["caution"] = [small_n_note(n, k) for n, k in zip(first["n"], first["n_pos"])]
    table.columns.name = None
    return table


PAIRED_TEXT = (
    "Each cell is AUROC(a) − AUROC(b) on the same test stays under the same mask, with a 95% CI "
    "from the same bootstrap resamples for both runs (paired: stays that are hard for one run "
    "are usually hard for the other, so this interval is narrower than the two runs' own "
    "intervals suggest). * = the CI excludes 0: the runs differ on these stays; otherwise this "
    "test set cannot tell them apart. No correction for looking at many points."
)


def captions(result) -> dict[str, str]:
    """What each figure of the evaluation shows and how to read it (for the reports)."""
    n_test = int(result.meta.get("n_test", 0))
    n_pos = None
    nat = result.grid[(result.grid["point"] == "natural") & (result.grid["metric"] == "auroc")]
    if len(nat) and "n_pos" in nat and pd.notna(nat["n_pos"].iloc[0]):
        n_pos = int(nat["n_pos"].iloc[0])
    few = small_n_note(n_test, n_pos)
    if few:
        few = f" Caution: a small test set ({few}): lines and bands move with a few stays."
    return {
        "auroc_vs_rate.png": (
            "AUROC (y axis) as more of the observed modalities are hidden (x axis: the simulated "
            "missing rate, the share of present modalities dropped), one panel per mechanism: "
            "MCAR drops at random, MAR with a probability that depends on covariates, MNAR on the "
            "label (or content). One coloured line per run with its 95% bootstrap band; solid "
            "black = the ceiling (what a perfect observer of the modalities left can reach; "
            "synthetic data only), dashed black = the oracle (true risk), dotted grey = chance "
            "(0.5). A robust run stays flat as the rate rises; where two runs' bands overlap, see "
            "the paired differences below before ranking them." + few
        ),
        "patterns.png": (
            "AUROC of each run (columns) when every test stay is shown only the modalities of one "
            "fixed pattern (rows; a stay keeps those of the pattern it has). The row label gives "
            "the pattern and the stays scored; brighter = higher AUROC, 0.5 = chance, grey n/a = "
            "undefined. Read down a column to see which modalities a run relies on, across a row "
            "to compare runs on equal inputs. ! marks rows with fewer than "
            f"{MIN_STAYS} stays or {MIN_CLASS} positives: unreliable."
        ),
        "natural_patterns.png": (
            "AUROC of each run on the test stays grouped by the modalities they actually have "
            "(nothing simulated): rows are the observed combinations, labelled with their "
            "number of stays. These groups are often small: ! marks those with fewer than "
            f"{MIN_STAYS} stays or {MIN_CLASS} positives, whose value (even 1.00) is unreliable; "
            "grey n/a = undefined (only one class in the group)."
        ),
    }


def _warning_lines(result) -> list[str]:
    """A visible warning when the whole test set is too small for the figures to mean much."""
    meta = result.meta
    nat = result.grid[(result.grid["point"] == "natural") & (result.grid["metric"] == "auroc")]
    n_pos = nat["n_pos"].iloc[0] if len(nat) and "n_pos" in nat else None
    note = small_n_note(meta.get("n_test"), n_pos)
    if not note:
        return []
    return [
        f"Small test set ({note}): every AUROC below rests on few stays; differences between "
        "runs and between points are mostly noise. Evaluate on a larger corpus before drawing "
        "conclusions."
    ]


def write_outputs(result, out_dir: Path) -> dict[str, Path]:
    """Write every table, plot and report of a :class:`~clinical_moe.evaluation.grid.GridResult`.

    Returns:
        Name -> path of each file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name in TABLES:
        df = getattr(result, name)
        for ext in ("csv", "parquet"):
            path = out_dir / f"{name}.{ext}"
            df.to_csv(path, index=False) if ext == "csv" else df.to_parquet(path, index=False)
            files[f"{name}.{ext}"] = path
    paired = getattr(result, "paired", None)
    paired = paired if paired is not None else pd.DataFrame()
    tables = (("runs", result.runs), ("oracle", result.oracle), ("ceiling", _ceil(result)))
    for name, df in (*tables, ("paired", paired)):
        df.to_csv(out_dir / f"{name}.csv", index=False)
        files[f"{name}.csv"] = out_dir / f"{name}.csv"
    result.masks.to_parquet(out_dir / "masks.parquet", index=False)
    files["masks.parquet"] = out_dir / "masks.parquet"
    (out_dir / "meta.json").write_text(json.dumps(result.meta, indent=2, default=str))
    files["meta.json"] = out_dir / "meta.json"

    oracle = result.oracle
    oracle_auroc = (
        float(oracle.loc[oracle["metric"] == "auroc", "value"].iloc[0]) if len(oracle) else None
    )
    plots = {
        "auroc_vs_rate.png": metric_vs_rate(
            result.grid, out_dir / "auroc_vs_rate.png", "auroc", oracle_auroc
        ),
        "patterns.png": pattern_heatmap(
            result.grid, out_dir / "patterns.png", "auroc", "AUROC under fixed modality patterns"
        ),
        "natural_patterns.png": pattern_heatmap(
            result.natural,
            out_dir / "natural_patterns.png",
            "auroc",
            "AUROC by naturally observed modality combination",
        ),
    }
    files.update({k: v for k, v in plots.items() if v is not None})
    files["summary.md"] = write_markdown(result, out_dir, [k for k, v in plots.items() if v])
    files["report.html"] = write_html(result, out_dir, [k for k, v in plots.items() if v])
    return files


def _ceil(result) -> pd.DataFrame:
    """The per-point ceiling table (empty for results made before it existed)."""
    return (
        getattr(result, "ceiling", None) if len(getattr(result, "ceiling", ())) else pd.DataFrame()
    )


def _ratio_table(grid: pd.DataFrame, column: str, points: list[str]) -> pd.DataFrame:
    """AUROC divided by a reference (``auroc_over_ceiling`` ...), points x runs, as text."""
    df = grid[(grid["metric"] == "auroc") & grid["point"].isin(points)]
    df = df.assign(value=df[column], ci_low=math.nan, ci_high=math.nan)
    return summary_table(df, "auroc", points)


def _ceiling_sections(result) -> list[tuple[str, pd.DataFrame]]:
    """AUROC / ceiling first (then / oracle) when the corpus has a truth, else nothing."""
    grid, ceil = result.grid, _ceil(result)
    if not len(ceil) or "auroc_over_ceiling" not in grid or grid["auroc_over_ceiling"].isna().all():
        return []
    points = _points_of_interest(grid) + list(grid.loc[grid["mechanism"] == "pattern", "point"])
    points = list(dict.fromkeys(points))
    refs = ceil.set_index("point").reindex(points)
    refs = refs.assign(
        **{c: [_fmt(v) for v in refs[c]] for c in ("ceiling_auroc", "oracle_auroc")}
    )[["n", "ceiling_auroc", "oracle_auroc", "ceiling_note"]]
    refs.index.name = "point"
    return [
        ("AUROC / ceiling (what an observer of the shown modalities can reach)",
         _ratio_table(grid, "auroc_over_ceiling", points)),
        ("Ceiling and oracle AUROC per point (same scored stays)", refs),
        ("AUROC / oracle (true risk; no observer can reach it)",
         _ratio_table(grid, "auroc_over_oracle", points)),
    ]  # fmt: skip


def _sections(result) -> list[tuple[str, pd.DataFrame]]:
    grid = result.grid
    out = _ceiling_sections(result) + [
        (
            "AUROC at selected points (95% bootstrap CI)",
            summary_table(grid, "auroc", _points_of_interest(grid)),
        )
    ]
    for metric in ("auprc", "f1", "ece", "brier"):
        out.append(
            (f"{LABELS[metric]} at natural missingness", summary_table(grid, metric, ["natural"]))
        )
    patterns = grid[grid["mechanism"] == "pattern"]
    if len(patterns):
        out.append(("AUROC under fixed patterns", summary_table(patterns, "auroc")))
    nat = result.natural
    if len(nat):
        nat = nat.assign(point=nat["pattern"])
        out.append(("AUROC by natural modality combination", summary_table(nat, "auroc")))
    paired = paired_table(
        getattr(result, "paired", None),
        list(dict.fromkeys(_points_of_interest(grid) + list(patterns["point"]))),
    )
    if len(paired):
        out.insert(
            len(_ceiling_sections(result)) + 1,
            ("Paired AUROC differences between runs (95% paired bootstrap CI)", paired),
        )
    return out


def _section_note(title: str) -> str:
    return PAIRED_TEXT if title.startswith("Paired") else ""


def _header_lines(result) -> list[str]:
    meta = result.meta
    lines = [
        f"Task: {meta['task']}; test stays: {meta['n_test']}; modalities: "
        f"{', '.join(meta['modalities'])}; seed {meta['seed']}; "
        f"{meta['eval_config']['bootstrap']} bootstrap resamples; "
        f"{meta['distinct_masks']} distinct masks; test split sha256 "
        f"{meta['test_split_sha256'][:16]}.",
    ]
    runs = result.runs
    for _, r in runs.iterrows():
        lines.append(
            f"Run {r['run']} ({r['head']}, id {r['run_id']}): validation AUROC "
            f"{_fmt(r['val_auroc'])}, F1 threshold {r['threshold']}."
        )
    if len(result.oracle):
        o = result.oracle.set_index("metric")
        lines.append(
            "Oracle (true risk, same test stays): AUROC "
            f"{_fmt(o.at['auroc', 'value'], o.at['auroc', 'ci_low'], o.at['auroc', 'ci_high'])}."
        )
    else:
        lines.append(f"Oracle: {meta['oracle']}.")
    ceil = _ceil(result)
    if len(ceil) and (ceil["point"] == "natural").any():
        nat = ceil.set_index("point").loc["natural"]
        lines.append(
            f"Ceiling at natural missingness (posterior risk given the shown modalities): AUROC "
            f"{_fmt(nat['ceiling_auroc'])} = {_fmt(nat['ceiling_over_oracle'])} of the oracle; "
            "tables show AUROC / ceiling first."
        )
    elif meta.get("ceiling"):
        lines.append(f"Ceiling: {meta['ceiling']}.")
    return lines


def write_markdown(result, out_dir: Path, plots: list[str]) -> Path:
    """``summary.md``: warning, header, figures with captions, summary tables."""
    parts = ["# Evaluation under simulated missingness", ""]
    parts += [f"> **Warning.** {line}" for line in _warning_lines(result)]
    parts += ["", *[f"- {line}" for line in _header_lines(result)]]
    caps = captions(result)
    parts += ["", "## Figures"]
    for p in plots:
        parts += ["", f"![{caps.get(p, p)}]({p})", "", f"*{caps.get(p, p)}*"]
    parts += ["", "## Tables", "", SMALL_N_RULE]
    for title, table in _sections(result):
        note = _section_note(title)
        parts += ["", f"### {title}", "", *([note, ""] if note else []), markdown_table(table)]
    parts += [
        "",
        "Tables: grid.csv / grid.parquet (tidy), natural.csv, runs.csv, oracle.csv, ceiling.csv, "
        "masks.parquet (stay ids only).",
    ]
    path = out_dir / "summary.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def write_html(result, out_dir: Path, plots: list[str]) -> Path:
    """``report.html``: the same content as the Markdown, with the PNGs embedded (base64)."""
    esc = html.escape
    body = ["<h1>Evaluation under simulated missingness</h1>"]
    body += [f'<p class="warn"><b>Warning.</b> {esc(line)}</p>' for line in _warning_lines(result)]
    body.append("<ul>")
    body += [f"<li>{esc(line)}</li>" for line in _header_lines(result)]
    body.append("</ul>")
    caps = captions(result)
    for p in plots:
        data = base64.b64encode((out_dir / p).read_bytes()).decode("ascii")
        body.append(
            f'<figure><img alt="{esc(caps.get(p, p))}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caps.get(p, p))}</figcaption></figure>"
        )
    body.append(f'<p class="note">{esc(SMALL_N_RULE)}</p>')
    for title, table in _sections(result):
        note = _section_note(title)
        body += [f"<h2>{esc(title)}</h2>", f'<p class="note">{esc(note)}</p>' if note else ""]
        table_html = (
            table.reset_index()
            .to_html(border=0, escape=True, index=False)
            .replace("<td>n=", '<td class="caution">n=')
        )
        body.append(f'<div class="tw">{table_html}</div>')
    style = (
        "body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:12px}td,th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%;height:auto}"
        ".tw{overflow-x:auto;max-width:100%}figure{margin:1.5em 0}"
        "figcaption{font-size:13px;color:#444;max-width:900px;margin-top:.3em}"
        ".note{font-size:13px;color:#444;max-width:900px}"
        ".warn{background:#fff3cd;border:1px solid #e0b000;padding:.5em .8em;max-width:900px}"
        "td.caution{color:#b00000;font-weight:bold;text-align:left}"
    )
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>clinical_moe evaluation"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(doc)
    return path
