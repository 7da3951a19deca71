"""Plots: accuracy-versus-classes curves per setting and the accuracy-matrix heat map of a run.

``curve_data`` reduces the per-session rows of the tabulated runs to mean, std, min and max over
seeds (what ``curves.csv`` holds); ``plot_curves`` draws one figure per setting, with published
per-session values dashed when given; ``read_matrix`` and ``plot_heatmap`` show one run's
``matrix.csv``. Figures are matplotlib ``Figure`` objects used directly (no pyplot state, PNG
through Agg), one column wide, written as PNG and SVG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pilot.tables.render import _row_label
from pilot.tables.results import (
    MATRIX_FILE,
    MATRIX_SPEC,
    ROW,
    SETTING,
    SPLIT_FILE,
    Results,
    TablesError,
    _lines,
    _read_json,
    _summary,
    read_records,
)

COLUMN_WIDTH_IN = 3.3
DPI = 300
STYLE = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "svg.fonttype": "none",
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.0,
    "lines.markersize": 2.5,
}
HEATMAP_SIZE_IN = (COLUMN_WIDTH_IN, 3.0)


def curve_data(results: Results, cells: pd.DataFrame) -> pd.DataFrame:
    """Per (method, variant, setting) and session: mean, sample std, min, max and count over seeds of
    ``acc`` against ``n_seen``: the numbers the curve plots draw (also written as curves.csv)."""
    keep = cells[ROW + SETTING].drop_duplicates()
    runs = results.runs.merge(keep, on=ROW + SETTING)[ROW + SETTING + ["run_dir"]]
    rows = results.sessions.merge(runs, on=["run_dir", "method", "dataset", "backbone", "scenario"])
    curves = (
        rows.groupby(ROW + SETTING + ["session", "n_seen"], sort=False)["acc"]
        .agg(mean="mean", std=lambda v: v.std(ddof=1), min="min", max="max", n="size")
        .reset_index()
    )
    rank = {key: i for i, key in enumerate(dict.fromkeys(zip(cells["method"], cells["variant"])))}
    settings = {key: i for i, key in enumerate(dict.fromkeys(zip(*(cells[d] for d in SETTING))))}
    order = [
        (settings[tuple(r[d] for d in SETTING)], rank[(r["method"], r["variant"])], r["session"])
        for r in curves.to_dict("records")
    ]
    return curves.iloc[sorted(range(len(curves)), key=order.__getitem__)].reset_index(drop=True)


def curve_figure_size(labels: Sequence[str]) -> tuple[int, tuple[float, float]]:
    """Legend columns and figure size (inches) of a curve plot: 3.3 in wide; 2.0 in for the axes
    plus 0.2 in per legend row (the legend sits below the axes: 2 columns, 1 when a label is long)."""
    columns = 1 if max(map(len, labels), default=0) > 22 else 2
    rows = 1 + math.ceil(len(labels) / columns)  # + the legend title
    return columns, (COLUMN_WIDTH_IN, round(2.0 + 0.2 * rows, 2))


def plot_curves(
    curves: pd.DataFrame, out_dir: Path, published: pd.DataFrame | None = None, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """One figure per setting: accuracy after each session against the classes seen, one line per
    method (mean over seeds) with a min–max band over seeds; published per-session values, when
    given and known for the setting, dashed with open markers in the method's colour."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    written = []
    order = list(dict.fromkeys(zip(curves["method"], curves["variant"])))
    with rc_context(STYLE):
        colors = _colors(len(order))
        for setting, data in curves.groupby(SETTING, sort=False):
            lines = list(dict.fromkeys(zip(data["method"], data["variant"])))
            references = (
                {m: _published_curve(published, m, setting, data[data["method"] == m]) for m, _ in lines}
                if published is not None
                else {}
            )
            labels = [_row_label(m, v) for m, v in lines] + (
                ["published (dashed)"] if any(r is not None for r in references.values()) else []
            )
            columns, size = curve_figure_size(labels)
            fig = Figure(figsize=size, dpi=DPI, layout="constrained")
            ax = fig.add_subplot()
            handles = []
            for method, variant in lines:
                line = data[(data["method"] == method) & (data["variant"] == variant)].sort_values("n_seen")
                color = colors[order.index((method, variant))]
                handles += ax.plot(
                    line["n_seen"], line["mean"], marker="o", color=color, label=_row_label(method, variant)
                )
                if (line["n"] > 1).any():
                    ax.fill_between(line["n_seen"], line["min"], line["max"], color=color, alpha=0.2, lw=0)
            for method, variant in lines:
                ref = references.get(method)
                if ref is not None and variant == next(v for m, v in lines if m == method):
                    color = colors[order.index((method, variant))]
                    ax.plot(ref["n_seen"], ref["value"], ls="--", marker="o", mfc="none", color=color, lw=0.8)
            if len(labels) > len(handles):
                handles.append(
                    Line2D([], [], ls="--", marker="o", mfc="none", color="0.3", lw=0.8, label="published (dashed)")
                )
            ax.set_xlabel("classes seen")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(" · ".join(setting))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
            ax.grid(True, lw=0.3, alpha=0.5)
            fig.legend(
                handles=handles,
                loc="outside lower center",
                ncols=columns,
                frameon=False,
                title="mean over seeds; band: min–max over seeds",
            )
            stem = out_dir / ("curves_" + "_".join(setting))
            for fmt in formats:
                path = stem.parent / f"{stem.name}.{fmt}"
                fig.savefig(path, dpi=DPI, format=fmt)
                written.append(path)
    return written


def _published_curve(published: pd.DataFrame, method: str, setting: tuple, ours: pd.DataFrame) -> pd.DataFrame | None:
    """Published per-session points for a curve, placed at our ``n_seen`` of the same session."""
    rows = published[
        (published["method"] == method)
        & (published["dataset"] == setting[0])
        & (published["backbone"] == setting[1])
        & (published["scenario"] == setting[2])
        & (published["metric"] == "acc")
        & published["session"].notna()
    ]
    if rows.empty:
        return None
    rows = rows.drop_duplicates(["source", "session"]).loc[lambda d: d["source"] == d["source"].iloc[0]]
    n_seen = dict(zip(ours["session"], ours["n_seen"]))
    rows = rows.assign(n_seen=rows["session"].astype(int).map(n_seen)).dropna(subset=["n_seen"])
    return rows.sort_values("n_seen") if len(rows) else None


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def read_matrix(run_dir: str | Path) -> np.ndarray:
    """The accuracy matrix ``R[k, j]`` of one run from its ``matrix.csv`` (NaN above the diagonal).

    The file is checked as ``sessions.csv`` is (``results.read_records``: readable, the header, whole
    rows, numbers in range), and then: one run only, ``block <= session``, each cell once (an exact
    repeat is harmless). Any problem is a ``TablesError`` naming the file: a heat map is asked for
    one run by name, so there is nothing to fall back on."""
    run_dir = Path(run_dir)
    path = run_dir / MATRIX_FILE
    if not run_dir.is_dir():
        raise TablesError(f"{run_dir} is not a directory (--heatmap takes a run directory)")
    if not path.exists():
        raise TablesError(f"{path} not found (--heatmap takes the directory of one run)")
    _, records, problems = read_records(path, MATRIX_SPEC)
    if not problems and not records:
        problems = ["has a header but no rows: no session has finished"]
    runs = {r["run_id"] for _, r, _ in records if "run_id" in r}
    if not problems and len(runs) > 1:
        problems.append(
            f"holds rows of {len(runs)} runs ({', '.join(sorted(runs))}): two runs wrote into one directory"
        )
    cells: dict[tuple[int, int], tuple[int, float]] = {}
    for line, r, _ in records if not problems else []:
        k, j = r["session"], r["block"]
        if j > k:
            problems.append(f"line {line}: block {j} > session {k} (after session k only blocks 0..k are tested)")
        elif (k, j) in cells and not (cells[k, j][1] == r["acc"] or (np.isnan(cells[k, j][1]) and np.isnan(r["acc"]))):
            problems.append(f"session {k}, block {j} appears on {_lines([cells[k, j][0], line])} with different acc")
        else:
            cells.setdefault((k, j), (line, r["acc"]))
    if problems:
        raise TablesError(f"{path}: {_summary(problems)}")
    size = max(max(k, j) for k, j in cells) + 1
    R = np.full((size, size), np.nan)
    for (k, j), (_, acc) in cells.items():
        R[k, j] = acc
    return R


def plot_heatmap(run_dir: str | Path, out_dir: Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Heat map of one run's accuracy matrix, cell values written in when there are at most 12
    sessions (at 7 pt more do not fit a column). Rows: after session k; columns: classes of session j;
    both numbered from 0, as in sessions.csv, matrix.csv and the log (the axis labels say so)."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    R = read_matrix(run_dir)
    split = _read_json(run_dir / SPLIT_FILE)
    title = " · ".join(str(split.get(k)) for k in ("method", "dataset", "scenario") if split.get(k) is not None)
    if split.get("seed") is not None:
        title += f" · seed {split['seed']}"
    size = len(R)
    with rc_context(STYLE):
        fig = Figure(figsize=HEATMAP_SIZE_IN, dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(R), cmap="viridis", vmin=0, vmax=100, aspect="equal")
        if size <= 12:
            for k in range(size):
                for j in range(k + 1):
                    if not np.isnan(R[k, j]):
                        text = f"{R[k, j]:.1f}" if size <= 6 else f"{R[k, j]:.0f}"
                        ax.text(
                            j, k, text, ha="center", va="center", fontsize=7, color="black" if R[k, j] > 60 else "white"
                        )
        ticks = np.arange(size) if size <= 12 else np.arange(0, size, max(1, size // 10))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("test classes of session j (from 0)")
        ax.set_ylabel("after session k (from 0)")
        ax.set_title(title or run_dir.name)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.set_label("top-1 accuracy (%)")
        written = []
        stem = out_dir / f"heatmap_{run_dir.name}"
        for fmt in formats:
            path = stem.parent / f"{stem.name}.{fmt}"
            fig.savefig(path, dpi=DPI, format=fmt)
            written.append(path)
    return written
