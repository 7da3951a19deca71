"""Plots: accuracy-versus-classes curves per setting and the accuracy-matrix heat map of a run.

``curve_data`` reduces the per-session rows of the tabulated runs to mean, std, min and max over
seeds (what ``curves.csv`` holds); ``curve_figures`` draws one figure per setting, with published
per-session values dashed when given, and ``plot_curves`` writes them; ``read_matrix``,
``heatmap_figure`` and ``plot_heatmap`` show one run's ``matrix.csv`` (the W&B sink draws the same
heat map from the rows in memory). Figures are matplotlib ``Figure`` objects used directly (no
pyplot state, rendered through Agg), one column wide, written as PNG, SVG and PDF.

Names are the readable ones of :data:`pilot.tables.render.PRETTY` ("CODA-Prompt", "ImageNet-R";
scenario labels such as "B0Inc10" stay as they are); file names keep pilot's identifiers. Each
method row gets its own colour from the Okabe-Ito palette (told apart by people with the common
colour-vision deficiencies), its own marker and its own line style, so a curve can be identified in
grey-scale print too. Sessions are numbered from 0, as in the CSVs: the curves' lower axis counts
the classes seen, the upper one names the session; the heat map numbers both axes from 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pilot.tables.render import PRETTY, _row_label

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # matplotlib >= 3.9; only for the annotation
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
FORMATS = ("png", "svg", "pdf")
STYLE: dict[RcKeyType, Any] = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "svg.fonttype": "none",  # text stays text in SVG
    "pdf.fonttype": 42,  # TrueType in PDF: editable text, accepted by publishers (Type 3 often is not)
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.0,
    "lines.markersize": 2.5,
}
HEATMAP_SIZE_IN = (COLUMN_WIDTH_IN, 3.0)
# Okabe & Ito (2008), "Color Universal Design": distinguishable with protanopia, deuteranopia and
# tritanopia. Yellow comes last: it is faint on white.
OKABE_ITO = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
# Plain dashes ("--") are left out: they mark published values.
LINESTYLES = ("-", "-.", ":", (0, (3, 1, 1, 1, 1, 1)))
PUBLISHED_STYLE: dict[str, Any] = {"ls": "--", "mfc": "none", "lw": 0.8}
MAX_SESSION_TICKS = 12  # up to this many sessions every one gets a tick; beyond, about 10 do


def readable(name: Any) -> str:
    """The name a reader knows for one of pilot's identifiers (``coda`` -> ``CODA-Prompt``,
    ``imagenet_r`` -> ``ImageNet-R``); anything not in :data:`PRETTY` (``B0Inc10``) unchanged."""
    return PRETTY.get(str(name), str(name))


def row_style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th method row (from 0): no two of the first
    eight rows share a colour, of the first ten a marker; the three cycle at different lengths."""
    return {
        "color": OKABE_ITO[index % len(OKABE_ITO)],
        "marker": MARKERS[index % len(MARKERS)],
        "ls": LINESTYLES[index % len(LINESTYLES)],
    }


def session_ticks(count: int) -> list[int]:
    """Which of ``count`` sessions get a tick: all up to :data:`MAX_SESSION_TICKS`, else every k-th
    (about ten), plus the last one unless it would crowd the tick before it."""
    if count <= MAX_SESSION_TICKS:
        return list(range(count))
    step = math.ceil(count / 10)
    ticks = list(range(0, count, step))
    return ticks + [count - 1] if count - 1 - ticks[-1] > step / 2 else ticks


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


def curve_figures(curves: pd.DataFrame, published: pd.DataFrame | None = None) -> list[tuple[str, Any]]:
    """One figure per setting, as ``(file stem, Figure)``: accuracy after each session against the
    classes seen, one line per method row (mean over seeds) with a min–max band over seeds;
    published per-session values, when given and known for the setting, dashed with open markers in
    the method's colour. The lower x axis counts classes seen (ticks at the sessions' class counts),
    the upper one numbers the sessions from 0. Build and save inside ``rc_context(STYLE)``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figures = []
    order = list(dict.fromkeys(zip(curves["method"], curves["variant"])))
    for setting, data in curves.groupby(SETTING, sort=False):
        lines = list(dict.fromkeys(zip(data["method"], data["variant"])))
        references = (
            {m: _published_curve(published, m, setting, data[data["method"] == m]) for m, _ in lines}
            if published is not None
            else {}
        )
        labels = [_row_label(readable(m), v) for m, v in lines] + (
            ["published (dashed)"] if any(r is not None for r in references.values()) else []
        )
        columns, size = curve_figure_size(labels)
        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        handles = []
        for method, variant in lines:
            line = data[(data["method"] == method) & (data["variant"] == variant)].sort_values("n_seen")
            style = row_style(order.index((method, variant)))
            handles += ax.plot(line["n_seen"], line["mean"], label=_row_label(readable(method), variant), **style)
            if (line["n"] > 1).any():
                ax.fill_between(line["n_seen"], line["min"], line["max"], color=style["color"], alpha=0.2, lw=0)
        for method, variant in lines:
            ref = references.get(method)
            if ref is not None and variant == next(v for m, v in lines if m == method):
                style = row_style(order.index((method, variant)))
                ax.plot(ref["n_seen"], ref["value"], color=style["color"], marker=style["marker"], **PUBLISHED_STYLE)
        if len(labels) > len(handles):
            handles.append(Line2D([], [], color="0.3", marker="o", label="published (dashed)", **PUBLISHED_STYLE))
        sessions = data[["session", "n_seen"]].drop_duplicates().sort_values("session")
        ticked = sessions.iloc[session_ticks(len(sessions))]
        if len(sessions) <= MAX_SESSION_TICKS:
            ax.set_xticks(ticked["n_seen"].tolist(), [str(int(n)) for n in ticked["n_seen"]])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        top = ax.secondary_xaxis("top")
        top.set_xticks(ticked["n_seen"].tolist(), [str(int(k)) for k in ticked["session"]])
        top.set_xlabel("after session (from 0)")
        ax.set_xlabel("classes seen")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(" · ".join(readable(part) for part in setting))
        ax.grid(True, lw=0.3, alpha=0.5)
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=columns,
            frameon=False,
            title="mean over seeds; band: min–max over seeds",
        )
        figures.append(("curves_" + "_".join(setting), fig))
    return figures


def plot_curves(
    curves: pd.DataFrame, out_dir: Path, published: pd.DataFrame | None = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write :func:`curve_figures` as ``curves_<dataset>_<backbone>_<scenario>.<format>`` into ``out_dir``."""
    from matplotlib import rc_context

    written = []
    with rc_context(STYLE):
        for stem, fig in curve_figures(curves, published):
            written += save_figure(fig, out_dir / stem, formats)
    return written


def save_figure(fig: Any, stem: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``stem.<format>`` for every format (call inside ``rc_context(STYLE)``, which
    holds the font settings that SVG and PDF read when they are written)."""
    paths = []
    for fmt in formats:
        path = stem.parent / f"{stem.name}.{fmt}"
        fig.savefig(path, dpi=DPI, format=fmt)
        paths.append(path)
    return paths


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
    return matrix_from_rows({"session": k, "block": j, "acc": acc} for (k, j), (_, acc) in cells.items())


def matrix_from_rows(rows: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """The square accuracy matrix from ``matrix.csv``-style rows (``session``, ``block``, ``acc``),
    NaN where no row gives a value (above the diagonal)."""
    cells = {(int(r["session"]), int(r["block"])): float(r["acc"]) for r in rows}
    size = max((max(k, j) for k, j in cells), default=-1) + 1
    R = np.full((size, size), np.nan)
    for (k, j), acc in cells.items():
        R[k, j] = acc
    return R


def heatmap_title(info: Mapping[str, Any]) -> str:
    """``SimpleCIL · CIFAR-100 · B0Inc10 · seed 1`` from a run's labels (``sessions.json`` or the
    run info); missing labels are left out."""
    title = " · ".join(readable(info[k]) for k in ("method", "dataset", "scenario") if info.get(k) is not None)
    if info.get("seed") is not None:
        title += f" · seed {info['seed']}"
    return title


def heatmap_figure(R: np.ndarray, title: str, dpi: int = DPI) -> Any:
    """Heat map of an accuracy matrix ``R[k, j]``, cell values written in when there are at most 12
    sessions (at 7 pt more do not fit a column). Rows: after session k; columns: classes of session j;
    both numbered from 0, as in sessions.csv, matrix.csv and the log (the axis labels say so). Viridis
    (perceptually uniform, readable with colour-vision deficiencies and in grey scale), 0–100 %.
    Build and save inside ``rc_context(STYLE)``."""
    from matplotlib.figure import Figure

    size = len(R)
    fig = Figure(figsize=HEATMAP_SIZE_IN, dpi=dpi, layout="constrained")
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
    ax.set_title(title)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("top-1 accuracy (%)")
    return fig


def plot_heatmap(run_dir: str | Path, out_dir: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write :func:`heatmap_figure` of one run's ``matrix.csv`` (checked by :func:`read_matrix`) as
    ``heatmap_<run directory name>.<format>`` into ``out_dir``; the title names the run's method,
    dataset, scenario and seed from its ``sessions.json``."""
    from matplotlib import rc_context

    run_dir = Path(run_dir)
    R = read_matrix(run_dir)
    title = heatmap_title(_read_json(run_dir / SPLIT_FILE)) or run_dir.name
    with rc_context(STYLE):
        return save_figure(heatmap_figure(R, title), out_dir / f"heatmap_{run_dir.name}", formats)
