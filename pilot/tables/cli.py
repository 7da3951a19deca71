"""The command line, ``python -m pilot.tables RESULTS_DIR...``.

``build_parser`` defines the options; ``main`` parses them and turns a ``TablesError`` into a message
and exit status 2; ``_main`` loads the results, builds and selects the cells, compares them with
published numbers, prints the Markdown table with reports of unmatched cells and runs left out, and
writes ``table.md``, ``table.tex``, ``table.csv``, ``incomplete.csv`` and the requested plots.

``--select-by acc_val`` (or ``acc_val_avg``) first keeps, per method and setting, only the sweep point
with the best mean validation score (:func:`pilot.tables.results.select_by`); the table then shows that
point's test numbers, says so in a footnote listing every point's score, and ``table.csv`` gets a
``selected_by`` column. Cells evaluated with batch-dependent predictions carry a mark explained in a
footnote (:mod:`pilot.tables.render`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pilot.tables.plots import curve_data, plot_curves, plot_heatmap, read_matrix
from pilot.tables.published import DEFAULT_PUBLISHED, attach_published, read_published, unmatched
from pilot.tables.render import _row_label, to_latex, to_markdown
from pilot.tables.results import (
    DEFAULT_METRICS,
    METRICS,
    NME_METRICS,
    ROW,
    SELECT_CRITERIA,
    SETTING,
    Results,
    Selection,
    TablesError,
    default_metrics,
    load_results,
    select,
    select_by,
    summarize,
)


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.tables",
        description="Paper tables and plots from pilot's result CSVs (sessions.csv of every run under RESULTS_DIR).",
        epilog="Example: python -m pilot.tables results/multirun --methods simplecil,l2p,dualprompt,coda "
        "--metrics acc_avg,acc_last,forgetting,time --compare --plots",
    )
    parser.add_argument("results", nargs="*", help="directories searched recursively for sessions.csv")
    parser.add_argument("--out", help="output directory (default: <first RESULTS dir>/tables)")
    parser.add_argument("--methods", help="comma list: rows to keep, in this order (default: all)")
    parser.add_argument("--datasets", help="comma list of datasets to keep, in this order")
    parser.add_argument("--backbones", help="comma list of backbones to keep, in this order")
    parser.add_argument("--scenarios", help="comma list of scenarios to keep (e.g. B0Inc10,B0Inc20), in this order")
    parser.add_argument(
        "--metrics",
        help=f"comma list of {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}, and "
        f"{','.join(NME_METRICS)} when a run has nearest-mean-of-exemplars scores)",
    )
    parser.add_argument("--digits", type=int, default=2, help="decimals shown (default: %(default)s)")
    parser.add_argument(
        "--compare",
        nargs="?",
        const=str(DEFAULT_PUBLISHED),
        metavar="PUBLISHED_CSV",
        help=f"add published values and ours − published (default file: {DEFAULT_PUBLISHED})",
    )
    parser.add_argument("--plots", action="store_true", help="accuracy-vs-classes curves per setting (PNG, SVG, PDF)")
    parser.add_argument(
        "--heatmap",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="accuracy-matrix heat map of this run (PNG, SVG, PDF); repeatable. Without RESULTS directories "
        "only the heat maps are written (no table, no curves; default --out: <first RUN_DIR>/tables)",
    )
    parser.add_argument(
        "--select-by",
        choices=SELECT_CRITERIA,
        help="per method and setting, keep only the sweep point (groups differing in method.* values) with the best "
        "mean validation score over seeds (acc_val: after the last session; acc_val_avg: mean over sessions) "
        "and report its test numbers; runs need scenario.val_fraction > 0",
    )
    parser.add_argument("--caption", help="LaTeX caption (default: says what the cells are)")
    parser.add_argument("--label", default="tab:results", help="LaTeX label (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``pilot-tables`` and ``python -m pilot.tables``: parse ``argv`` (default: the command line), build the
    tables; returns the exit status."""
    parser = build_parser()
    if argv is None and Path(sys.argv[0]).name == "pilot-tables":
        parser.prog = "pilot-tables"
    args = parser.parse_args(argv)
    if args.compare and Path(args.compare).is_dir():  # `--compare RESULTS_DIR`: the flag took a results dir
        args.results.append(args.compare)
        args.compare = str(DEFAULT_PUBLISHED)
    if not args.results and not args.heatmap:
        parser.error("give at least one results directory (or only --heatmap RUN_DIR)")
    if not args.results and args.plots:
        parser.error("--plots needs results directories (--heatmap alone draws only the heat maps)")
    try:
        return _main(args)
    except TablesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if not args.results:
        return _heatmaps_only(args.heatmap, Path(args.out) if args.out else Path(args.heatmap[0]) / "tables")
    requested = _list(args.metrics)
    unknown = [m for m in requested or [] if m not in METRICS]
    if unknown:
        raise TablesError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    out_dir = Path(args.out) if args.out else Path(args.results[0]) / "tables"
    results = load_results(args.results, warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    metrics = requested or default_metrics(results.runs)
    notes: list[str] = []
    selections: list[Selection] = []
    if args.select_by:
        results, selections, left_out = _select_points(results, args.select_by)
        for message in left_out:
            print(f"note: {message}", file=sys.stderr)
        notes = _selection_notes(args.select_by, selections, args.digits)
    filters = dict(
        methods=_list(args.methods),
        datasets=_list(args.datasets),
        backbones=_list(args.backbones),
        scenarios=_list(args.scenarios),
    )
    cells = (
        summarize(results.runs, metrics)
        if len(results.runs)
        else pd.DataFrame(
            columns=ROW
            + SETTING
            + ["metric", "unit", "mean", "std", "n", "seeds", "group_id", "run_dirs", "eval_protocol", "memory"]
        )
    )
    if args.select_by:  # which rows were chosen, and by what (table.csv)
        chosen = {s.group_id for s in selections}
        cells["selected_by"] = [args.select_by if g in chosen else "" for g in cells["group_id"]]
    for name, wanted in filters.items():
        column = name[:-1]
        missing = [w for w in wanted or [] if w not in set(cells[column])]
        if missing:
            print(f"note: no finished runs for {column} {', '.join(missing)}", file=sys.stderr)
    cells = select(cells, metrics=metrics, **filters)
    published = read_published(args.compare) if args.compare else None
    if published is not None:
        cells = attach_published(cells, published)
    out_dir.mkdir(parents=True, exist_ok=True)

    markdown = to_markdown(cells, args.digits, notes)
    report = [markdown]
    if published is not None:
        report.append(_unmatched_report(unmatched(cells, published)))
    report.append(_incomplete_report(results.incomplete))
    text = "\n".join(r for r in report if r)
    print(text, end="")
    written = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv", out_dir / "incomplete.csv"]
    written[0].write_text(text)
    written[1].write_text(to_latex(cells, args.digits, args.caption, args.label, notes))
    table = cells.copy()
    for column in ("published", "diff", "published_source", "published_note", "published_others"):
        if column not in table.columns:
            table[column] = np.nan
    table.to_csv(written[2], index=False)
    results.incomplete.to_csv(written[3], index=False)
    if args.plots and len(cells):
        curves = curve_data(results, cells)
        curves.to_csv(out_dir / "curves.csv", index=False)
        written.append(out_dir / "curves.csv")
        written += plot_curves(curves, out_dir, published)
    for run_dir in args.heatmap:
        written += plot_heatmap(run_dir, out_dir)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if cells.empty:
        print("no finished runs match: nothing to tabulate", file=sys.stderr)
        return 1
    return 0


def _heatmaps_only(run_dirs: Sequence[str], out_dir: Path) -> int:
    """``--heatmap RUN_DIR`` without results directories: every run's matrix is checked first, then
    only the heat maps are written (no table, no curves, no CSV)."""
    for run_dir in run_dirs:
        read_matrix(run_dir)  # a bad matrix.csv stops here, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [path for run_dir in run_dirs for path in plot_heatmap(run_dir, out_dir)]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _select_points(results: Results, criterion: str) -> tuple[Results, list[Selection], list[str]]:
    """``--select-by``: the results with only the chosen sweep points' runs (and their rows)."""
    runs, selections, left_out = select_by(results.runs, criterion)
    sessions = results.sessions
    if len(sessions):
        sessions = sessions[sessions["run_dir"].isin(runs["run_dir"])].reset_index(drop=True)
    return dataclasses.replace(results, runs=runs.reset_index(drop=True), sessions=sessions), selections, left_out


def _selection_notes(criterion: str, selections: Sequence[Selection], digits: int) -> list[str]:
    """The footnote that says how rows were chosen, and each choice with the scores of every point."""
    what = (
        "validation top-1 after the last session" if criterion == "acc_val" else "mean validation top-1 over sessions"
    )
    head = (
        f"Selected by {criterion} ({what}, mean over seeds): per method and setting, only the sweep point with "
        "the best validation score is shown, with its own test numbers"
    )
    if not selections:
        return [head + " (no setting had more than one point to choose from)."]
    return [head + ":"] + [f"  {s.describe(digits)}" for s in selections]


def _incomplete_report(incomplete: pd.DataFrame) -> str:
    if incomplete.empty:
        return ""
    lines = [f"Not in the table ({len(incomplete)} run(s): incomplete, unreadable or superseded):"]
    for r in incomplete.to_dict("records"):
        total = r["num_sessions"]
        total = "?" if total is None or (isinstance(total, float) and math.isnan(total)) else int(total)
        labels = " ".join(str(r[k]) for k in ("method", "dataset", "backbone", "scenario") if isinstance(r[k], str))
        seed = r["seed"]
        seed = "" if seed is None or (isinstance(seed, float) and math.isnan(seed)) else f" s{int(seed)}"
        lines.append(f"  {r['run_dir']}  {labels}{seed}  sessions {int(r['sessions_done'])}/{total}  ({r['reason']})")
    return "\n".join(lines) + "\n"


def _unmatched_report(cells: pd.DataFrame) -> str:
    if cells.empty:
        return "Every cell has a published counterpart.\n"
    lines = [f"No published counterpart ({len(cells)} cell(s)):"]
    for (method, variant, *setting), group in cells.groupby(ROW + SETTING, sort=False):
        lines.append(f"  {_row_label(method, variant)} · {' · '.join(setting)}: {', '.join(group['metric'])}")
    return "\n".join(lines) + "\n"
