"""Rendering table cells as Markdown and LaTeX.

Both writers lay the cells out on one grid (``_Grid``): a row per method and variant, per setting a
column per metric (with published value and difference columns when compared) and the number of
seeds (and, when a run keeps exemplars, its memory size: ``2000`` in total or ``20/class``); the best
mean per column is set in bold. ``to_markdown`` writes a pipe table with a caption
line, ``to_latex`` a booktabs table with pretty labels (``PRETTY``) and escaped text.

A cell whose runs' predictions depended on the test batch carries a mark (``†`` on class-sorted test
batches, ``‡`` on shuffled ones; :func:`pilot.tables.results.protocol_mark`), and the table ends with a
footnote per mark used, followed by any ``notes`` the caller adds (e.g. how ``--select-by`` chose rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from pilot.tables.results import METRICS, PROTOCOL_NOTES, ROW, SETTING, protocol_mark

PRETTY = {  # LaTeX only; Markdown and CSV keep pilot's labels (what you type on the command line)
    "finetune": "Finetune",
    "icarl": "iCaRL",
    "coil": "COIL",
    "der": "DER",
    "foster": "FOSTER",
    "memo": "MEMO",
    "dgr": "DGR",
    "simplecil": "SimpleCIL",
    "l2p": "L2P",
    "dualprompt": "DualPrompt",
    "coda": "CODA-Prompt",
    "ease": "EASE",
    "slca": "SLCA",
    "aper_finetune": "APER w/ Finetune",
    "aper_vpt_shallow": "APER w/ VPT-Shallow",
    "aper_vpt_deep": "APER w/ VPT-Deep",
    "aper_ssf": "APER w/ SSF",
    "aper_adapter": "APER w/ Adapter",
    "ranpac": "RanPAC",
    "fecam": "FeCAM",
    "mos": "MOS",
    "lae": "LAE",
    "cofima": "CoFiMA",
    "duct": "DUCT",
    "cifar100": "CIFAR-100",
    "imagenet_r": "ImageNet-R",
    "imagenet_a": "ImageNet-A",
    "cub": "CUB-200",
    "omnibenchmark": "OmniBenchmark",
    "vtab": "VTAB",
    "objectnet": "ObjectNet",
    "fashion_mnist": "Fashion-MNIST",
    "synthetic": "Synthetic",
    "vit_b16_in1k": "ViT-B/16-IN1K",
    "vit_b16_in21k": "ViT-B/16-IN21K",
    "efficientnet_lite0": "EfficientNet-Lite0",
    "vit_test_tiny": "tiny ViT (test)",
}


def _fmt(value: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _row_label(method: str, variant: str) -> str:
    return f"{method} [{variant}]" if variant else method


def _layout(cells: pd.DataFrame) -> tuple[list[tuple], list[tuple], list[str], list[str]]:
    """Rows (method, variant), settings (dataset, backbone, scenario), metrics, and the setting
    dimensions that vary (shown in column headers; the constant ones go in a caption line)."""
    rows = list(dict.fromkeys(zip(cells["method"], cells["variant"])))
    settings = list(dict.fromkeys(zip(cells["dataset"], cells["backbone"], cells["scenario"])))
    metrics = list(dict.fromkeys(cells["metric"]))
    varying = [dim for i, dim in enumerate(SETTING) if len({s[i] for s in settings}) > 1]
    return rows, settings, metrics, varying


def _best(cells: pd.DataFrame, digits: int) -> set[tuple]:
    """Keys (method, variant, dataset, backbone, scenario, metric) of the best mean per column (ties
    at the displayed precision all count); only columns with two or more values."""
    best = set()
    for (setting, metric), column in cells.groupby([cells[SETTING].apply(tuple, axis=1), "metric"], sort=False):
        higher = METRICS[metric].higher_better
        shown = column["mean"].round(digits).dropna()
        if higher is None or len(shown) < 2:
            continue
        target = shown.max() if higher else shown.min()
        for idx in shown.index[shown == target]:
            r = column.loc[idx]
            best.add((r["method"], r["variant"], *setting, metric))
    return best


_TEX_MARKS = {"†": r"$^\dagger$", "‡": r"$^\ddagger$"}


def _marks(cells: pd.DataFrame) -> list[str]:
    """The protocol marks the cells use, in the order of :data:`PROTOCOL_NOTES`."""
    if "eval_protocol" not in cells.columns:
        return []
    used = {protocol_mark(p) for p in cells["eval_protocol"]}
    return [mark for mark in PROTOCOL_NOTES if mark in used]


def _footnotes(cells: pd.DataFrame, notes: Sequence[str]) -> list[str]:
    """One line per protocol mark used (``† ...``), then ``notes``."""
    return [f"{mark} {PROTOCOL_NOTES[mark]}" for mark in _marks(cells)] + list(notes)


def _compare_columns(cells: pd.DataFrame) -> set[tuple]:
    if "published" not in cells.columns:
        return set()
    matched = cells[cells["published"].notna()]
    return set(zip(matched["dataset"], matched["backbone"], matched["scenario"], matched["metric"]))


@dataclass
class _Grid:
    """A table as strings, shared by the Markdown and LaTeX writers."""

    rows: list[tuple[str, str]]  # (method, variant), in order
    spans: list[tuple[tuple, int, int]]  # (setting, first column, past-last column) of the body
    varying: list[str]  # setting dimensions that differ between settings
    header: list[str]  # one label per body column
    body: list[list[str]]  # one list of cells per row


def _grid(cells: pd.DataFrame, digits: int, latex: bool) -> _Grid:
    rows, settings, metrics, varying = _layout(cells)
    best, compared = _best(cells, digits), _compare_columns(cells)
    empty = "--" if latex else "—"
    index = {tuple(r[k] for k in ROW + SETTING + ["metric"]): r for r in cells.to_dict("records")}
    seeds = cells.groupby(ROW + SETTING)["n"].max().to_dict()
    memory = _memory_labels(cells)
    header: list[str] = []
    spans: list[tuple[tuple[Any, ...], int, int]] = []
    for setting in settings:
        start = len(header)
        for metric in metrics:
            label = METRICS[metric].latex if latex else METRICS[metric].markdown
            header.append(label)
            if setting + (metric,) in compared:
                header += ["pub." if latex else f"{label} pub.", r"$\Delta$" if latex else f"{label} Δ"]
        if memory:
            header.append("mem." if latex else "memory")
        header.append("$n$" if latex else "n")
        spans.append((setting, start, len(header)))
    body = []
    for method, variant in rows:
        line = []
        for setting in settings:
            for metric in metrics:
                key = (method, variant, *setting, metric)
                cell = index.get(key)
                if cell is None:
                    line.append(empty)
                else:
                    mean, std = _fmt(cell["mean"], digits), _fmt(cell["std"], digits)
                    if key in best:
                        mean = rf"\textbf{{{mean}}}" if latex else f"**{mean}**"
                    if std:
                        mean += rf"\,{{\scriptsize$\pm${std}}}" if latex else f" ± {std}"
                    mark = protocol_mark(cell.get("eval_protocol")) if mean else ""
                    if mark:
                        mean += _TEX_MARKS[mark] if latex else f" {mark}"
                    line.append(mean or empty)
                if setting + (metric,) in compared:
                    line.append((cell is not None and _fmt(cell["published"], digits)) or empty)
                    line.append((cell is not None and _fmt(cell["diff"], digits, signed=True)) or empty)
            if memory:
                label = memory.get((method, variant, *setting)) or ""
                line.append((_tex(label) if latex else label) or empty)
            n = seeds.get((method, variant, *setting))
            line.append(str(n) if n else empty)
        body.append(line)
    return _Grid(rows, spans, varying, header, body)


def _memory_labels(cells: pd.DataFrame) -> dict[tuple, str]:
    """Per (method, variant, setting) the exemplar memory of its runs (``2000``, ``20/class``; "" without
    one); empty when no run in the table has a memory, and the column is then left out."""
    if "memory" not in cells.columns or not cells["memory"].fillna("").astype(str).str.len().any():
        return {}
    labels = cells.assign(memory=cells["memory"].fillna("").astype(str)).groupby(ROW + SETTING)["memory"].first()
    return labels.to_dict()


def _setting_label(setting: tuple, dims: Sequence[str], pretty: bool = False) -> str:
    parts = [setting[SETTING.index(d)] for d in dims]
    return " ".join(PRETTY.get(p, p) if pretty else p for p in parts)


def to_markdown(cells: pd.DataFrame, digits: int = 2, notes: Sequence[str] = ()) -> str:
    """A pipe table: one row per method (and variant); per setting and metric ``mean ± std``, the
    best mean per column in bold; ``n`` = seeds; with published values, ``pub.`` and ``Δ`` columns.
    Below it, a footnote per protocol mark used, then ``notes`` (one line each)."""
    if cells.empty:
        return "(no results)\n"
    grid = _grid(cells, digits, latex=False)
    header, varying = list(grid.header), grid.varying
    if len(grid.spans) > 1:
        for setting, start, stop in grid.spans:
            label = _setting_label(setting, varying)
            for i in range(start, stop):
                header[i] = f"{label}: {header[i]}"
    table = [["method"] + header] + [
        [_row_label(m, v).replace("|", "\\|")] + line for (m, v), line in zip(grid.rows, grid.body)
    ]
    widths = [max(3, *(len(r[i]) for r in table)) for i in range(len(table[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
        for r in table
    ]
    rule = (
        "| " + " | ".join(":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    )
    _, settings, _, _ = _layout(cells)
    constant = [d for d in SETTING if d not in varying]
    caption = "  ·  ".join(f"{d} {settings[0][SETTING.index(d)]}" for d in constant)
    note = "mean ± sample std (ddof=1) over seeds; no ± with one seed; n = seeds; best mean per column in bold"
    if _memory_labels(cells):
        note += "; memory = exemplars kept (a total, or per class; — without a memory)"
    if "published" in cells.columns:
        note += "; pub. = published value (first match in the published file), Δ = ours − published"
    head = (f"Setting: {caption}\n" if caption else "") + f"({note})\n\n"
    footnotes = _footnotes(cells, notes)
    foot = "\n" + "\n".join(footnotes) + "\n" if footnotes else ""
    return head + "\n".join([lines[0], rule] + lines[1:]) + "\n" + foot


_TEX_ESCAPES = str.maketrans(
    {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\^{}",
    }
)


def _tex(text: str) -> str:
    return text.translate(_TEX_ESCAPES)


def to_latex(
    cells: pd.DataFrame,
    digits: int = 2,
    caption: str | None = None,
    label: str = "tab:results",
    notes: Sequence[str] = (),
) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): a header row per setting with
    ``\\cmidrule``s, then metric names; best mean per column in ``\\textbf``; std in ``\\scriptsize``;
    protocol marks as superscript daggers, explained (with ``notes``) in small print below the table."""
    if cells.empty:
        return "% no results\n"
    grid = _grid(cells, digits, latex=True)
    header, spans, rows, body = grid.header, grid.spans, grid.rows, grid.body
    _, settings, _, _ = _layout(cells)
    dims = grid.varying if len(settings) > 1 else SETTING
    constant = [d for d in SETTING if d not in dims]
    if caption is None:
        caption = r"Mean $\pm$ sample std over seeds ($n$ seeds); best mean per column in bold."
        if _memory_labels(cells):
            caption += " mem.: exemplars kept (a total, or per class)."
        if "published" in cells.columns:
            caption += r" pub.: published value; $\Delta$ = ours $-$ published."
        if constant:
            caption += (
                " "
                + ", ".join(
                    _tex(PRETTY.get(settings[0][SETTING.index(d)], settings[0][SETTING.index(d)])) for d in constant
                )
                + "."
            )
    colspec = "@{}l" + "".join(" " + "r" * (stop - start) for _, start, stop in spans) + "@{}"
    groups = " & ".join(
        rf"\multicolumn{{{stop - start}}}{{c}}{{{_tex(_setting_label(s, dims, pretty=True))}}}"
        for s, start, stop in spans
    )
    rules = "".join(rf"\cmidrule(lr){{{start + 2}-{stop + 1}}}" for _, start, stop in spans)
    lines = [
        "% Generated by python -m pilot.tables; needs \\usepackage{booktabs}",
        r"\begin{table}[t]",
        r"  \centering",
        r"  \small",
        rf"  \caption{{{caption}}}",
        rf"  \label{{{label}}}",
        rf"  \begin{{tabular}}{{{colspec}}}",
        r"    \toprule",
        rf"    & {groups} \\",
        rf"    {rules}",
        "    Method & " + " & ".join(header) + r" \\",
        r"    \midrule",
    ]
    for (method, variant), line in zip(rows, body):
        name = _tex(PRETTY.get(method, method)) + (rf" {{\scriptsize[{_tex(variant)}]}}" if variant else "")
        lines.append(f"    {name} & " + " & ".join(line) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}"]
    for mark in _marks(cells):
        lines.append(rf"  \par\smallskip{{\footnotesize {_TEX_MARKS[mark]} {_tex(PROTOCOL_NOTES[mark])}}}")
    lines += [rf"  \par\smallskip{{\footnotesize {_tex(note)}}}" for note in notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
