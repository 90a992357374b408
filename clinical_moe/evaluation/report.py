"""Write an evaluation to disk: tidy tables (CSV + Parquet), PNG plots, Markdown and HTML reports.

Layout of ``out_dir``::

    grid.csv / grid.parquet          run x point x metric (value, 95% CI, n, prevalence, ...)
    natural.csv / natural.parquet    run x natural modality combination x metric
    runs.csv                         run, id, head, validation threshold and scores
    oracle.csv                       true-risk scores on the same test stays (synthetic data only)
    ceiling.csv                      per point: ceiling and oracle AUROC (synthetic data only)
    masks.parquet                    every distinct mask: point, stay_id, has_<modality>
    meta.json                        settings, seeds, test split hash, timings
    auroc_vs_rate.png  patterns.png  natural_patterns.png
    summary.md  report.html          the HTML embeds the PNGs (one self-contained file)

Only stay ids, counts and scores are written: never any free text of a patient.
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
    n = df.drop_duplicates("point").set_index("point")["n"].reindex(order)
    table.insert(0, "n", n.astype(int))
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
    for name, df in (("runs", result.runs), ("oracle", result.oracle), ("ceiling", _ceil(result))):
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
    return out


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
    """``summary.md``: header, summary tables, links to the plots."""
    parts = ["# Evaluation under simulated missingness", ""]
    parts += [f"- {line}" for line in _header_lines(result)]
    for title, table in _sections(result):
        parts += ["", f"## {title}", "", markdown_table(table)]
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
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
    body = ["<h1>Evaluation under simulated missingness</h1>", "<ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in _header_lines(result)]
    body.append("</ul>")
    for p in plots:
        data = base64.b64encode((out_dir / p).read_bytes()).decode("ascii")
        body.append(
            f'<figure><img alt="{html.escape(p)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(p)}</figcaption></figure>"
        )
    for title, table in _sections(result):
        body += [f"<h2>{html.escape(title)}</h2>", table.to_html(border=0, escape=True)]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:12px}td,th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}"
    )
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>clinical_moe evaluation"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(doc)
    return path
