"""Result CSVs -> paper tables and plots.

    python -m pilot.tables RESULTS_DIR... [--methods simplecil,l2p,...] [--metrics acc_avg,acc_last,forgetting,time]
                           [--datasets ...] [--backbones ...] [--scenarios ...] [--compare [PUBLISHED_CSV]]
                           [--plots] [--heatmap RUN_DIR] [--out DIR]

Every ``sessions.csv`` under the given directories is one run (single runs and Hydra multirun sweeps
alike). Runs that differ only by their seed share a ``group_id`` (pilot/run_info.py) and make one
table cell: mean ± sample std (ddof=1) over seeds of the last session's values, with the number of
seeds. Rows are methods, columns are settings (dataset × backbone × scenario) × metrics:

* ``acc_avg``  = Ā, the average incremental accuracy (``acc_avg`` of the last session),
* ``acc_last`` = A_last, the top-1 after the last session (``acc`` of the last session),
* ``forgetting``, ``bwt``, ``acc_top5`` (last session), ``time`` (``elapsed_s`` of the last session,
  in minutes), ``memory`` (peak GPU memory over sessions, GB), ``params`` (trainable, millions).

Groups with the same method/dataset/backbone/scenario labels but a different configuration (a
learning-rate sweep, ...) are never merged: each becomes its own row, labelled with the config
values that differ (read from each run's ``config.yaml``). Incomplete runs (fewer rows than
``num_sessions``) and superseded reruns of the same run_id are listed apart and never averaged.

Outputs (``--out``, default ``<first results dir>/tables``): ``table.md`` (also printed), ``table.tex``
(booktabs, best mean per column in bold), ``table.csv`` (long form: one row per cell with mean, std,
n, seeds, and the published value and difference with ``--compare``), ``incomplete.csv``; with
``--plots`` per setting ``curves_<dataset>_<backbone>_<scenario>.{png,svg}`` and ``curves.csv``; with
``--heatmap RUN_DIR`` the accuracy matrix of that run as ``heatmap_<run>.{png,svg}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from pilot.run_info import NON_SEMANTIC_KEYS, SEMANTIC_RUNTIME_KEYS

SESSIONS_FILE, MATRIX_FILE, CONFIG_FILE, SPLIT_FILE = "sessions.csv", "matrix.csv", "config.yaml", "sessions.json"
SETTING = ["dataset", "backbone", "scenario"]
ROW = ["method", "variant"]
DEFAULT_PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "published.csv"
# Known methods first, in this order; any other method follows alphabetically.
METHOD_ORDER = [
    "simplecil",
    "l2p",
    "dualprompt",
    "coda",
    "ease",
    "slca",
    "aper_finetune",
    "aper_vpt_shallow",
    "aper_vpt_deep",
    "aper_ssf",
    "aper_adapter",
    "ranpac",
    "fecam",
    "mos",
]
PRETTY = {  # LaTeX only; Markdown and CSV keep pilot's labels (what you type on the command line)
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


@dataclass(frozen=True)
class Metric:
    """A table metric: ``column`` of the run's last ``sessions.csv`` row (or ``reduce`` over all rows),
    scaled by ``scale`` into ``unit``; ``higher_better`` None = no best value is marked."""

    column: str
    markdown: str
    latex: str
    unit: str
    higher_better: bool | None
    scale: float = 1.0
    reduce: str = "last"


METRICS = {
    "acc_avg": Metric("acc_avg", "Ā", r"$\bar{A}$", "%", True),
    "acc_last": Metric("acc", "A_last", r"$A_\mathrm{last}$", "%", True),
    "forgetting": Metric("forgetting", "F", r"$F$", "%", False),
    "bwt": Metric("bwt", "BWT", r"BWT", "%", True),
    "acc_top5": Metric("acc_top5", "top-5", r"top-5", "%", True),
    "time": Metric("elapsed_s", "time [min]", r"time [min]", "min", False, 1 / 60),
    "memory": Metric("peak_mem_mb", "mem [GB]", r"mem.\ [GB]", "GB", False, 1 / 1024, "max"),
    "params": Metric("params_trainable", "params [M]", r"params [M]", "M", None, 1e-6),
}
DEFAULT_METRICS = ["acc_avg", "acc_last"]


class TablesError(Exception):
    """Bad input to the table builder (nothing found, unknown metric...): printed, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Reading runs


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``paths`` that holds a ``sessions.csv`` (each directory once)."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise TablesError(f"{path} does not exist")
        files = [path] if path.is_file() and path.name == SESSIONS_FILE else sorted(path.rglob(SESSIONS_FILE))
        for file in files:
            found.setdefault(file.parent.resolve(), None)
    return list(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """One run: a summary dict (labels, seed, sessions done/total, ``problem`` when it cannot be
    averaged, the config flattened) and its ``sessions.csv`` rows."""
    info: dict[str, Any] = {"run_dir": str(run_dir), "problem": ""}
    split = _read_json(run_dir / SPLIT_FILE)
    for key in ("run_id", "group_id", "method", "dataset", "backbone", "scenario", "seed", "num_sessions"):
        info[key] = split.get(key)
    try:
        rows = pd.read_csv(run_dir / SESSIONS_FILE, dtype={"run_id": str, "group_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        info.update(sessions_done=0, problem=f"unreadable {SESSIONS_FILE}: {err}")
        return info, pd.DataFrame()
    if len(rows) and "session" in rows.columns:
        rows = rows.sort_values("session", kind="stable").reset_index(drop=True)
    if len(rows):
        first = rows.iloc[0]
        for key in ("run_id", "group_id", "method", "dataset", "backbone", "scenario", "seed", "num_sessions"):
            if key in rows.columns:
                info[key] = first[key].item() if hasattr(first[key], "item") else first[key]
    info["sessions_done"] = int(rows["session"].nunique()) if "session" in rows.columns else 0
    total = info["num_sessions"]
    if total is None or (isinstance(total, float) and math.isnan(total)):
        info["problem"] = "num_sessions unknown (no rows and no sessions.json)"
    elif len(rows) and (rows["session"].duplicated().any() or sorted(rows["session"]) != list(range(len(rows)))):
        info["problem"] = f"session column is not 0..{len(rows) - 1} without repeats"
    elif info["sessions_done"] < int(total):
        info["problem"] = "incomplete"
    info["finished_at"] = str(rows["finished_at"].iloc[-1]) if len(rows) and "finished_at" in rows else ""
    info["config"] = _flat_config(run_dir / CONFIG_FILE, info.get("seed"))
    rows = rows.assign(run_dir=str(run_dir))
    return info, rows


def _flat_config(path: Path, seed: Any) -> dict[str, str] | None:
    """The resolved config as ``{dotted.key: value}`` with what does not define the setting removed
    (exactly what ``run_info.config_hash`` leaves out, and the seed)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    config = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS and k != "seed"}
    if isinstance(config.get("runtime"), dict):
        config["runtime"] = {k: v for k, v in config["runtime"].items() if k in SEMANTIC_RUNTIME_KEYS}
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node) if isinstance(node, (list, dict)) else str(node)

    walk(config, "")
    scenario_seed = flat.get("scenario.order_seed")
    if scenario_seed is not None and seed is not None and scenario_seed == str(seed):
        flat["scenario.order_seed"] = "${seed}"  # follows the seed: not a difference between groups
    return flat


@dataclass
class Results:
    """What was found under the results directories."""

    runs: pd.DataFrame  # complete, averaged runs: one row per run, last-session metrics, ``variant``
    sessions: pd.DataFrame  # every sessions.csv row of those runs
    incomplete: pd.DataFrame  # runs that are not averaged, with ``reason``


def load_results(paths: Iterable[str | Path]) -> Results:
    """Read every run under ``paths``; split complete runs from incomplete or superseded ones."""
    paths = list(paths)
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise TablesError(f"no {SESSIONS_FILE} found under {', '.join(map(str, paths))}")
    infos, frames = [], []
    for run_dir in run_dirs:
        info, rows = read_run(run_dir)
        if not info["problem"]:
            last = rows.iloc[-1]
            for name, metric in METRICS.items():
                if metric.column in rows.columns:
                    values = pd.to_numeric(rows[metric.column], errors="coerce")
                    value = values.max() if metric.reduce == "max" else values.iloc[-1]
                    info[name] = float(value) * metric.scale
            info["num_sessions"] = int(last["num_sessions"])
            frames.append(rows)
        infos.append(info)
    runs = pd.DataFrame(infos)
    done = runs["problem"] == ""
    incomplete = runs[~done].copy()
    incomplete["reason"] = incomplete["problem"]
    runs = runs[done].copy()
    # The same run (run_id = config and seed) found twice: keep the most recent, list the others.
    runs = runs.sort_values(["finished_at", "run_dir"])
    repeated = runs.duplicated("run_id", keep="last")
    superseded = runs[repeated].copy()
    superseded["reason"] = (
        "superseded: the same run_id finished again later ("
        + superseded["run_id"].map(dict(zip(runs.loc[~repeated, "run_id"], runs.loc[~repeated, "run_dir"])))
        + ")"
    )
    runs = runs[~repeated].copy()
    incomplete = pd.concat([incomplete, superseded], ignore_index=True)
    runs["seed"] = runs["seed"].astype(int)
    runs = assign_variants(runs.reset_index(drop=True))
    sessions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(sessions):
        sessions = sessions[sessions["run_dir"].isin(runs["run_dir"])]
    columns = [
        "run_dir",
        "method",
        "dataset",
        "backbone",
        "scenario",
        "seed",
        "sessions_done",
        "num_sessions",
        "reason",
    ]
    return Results(runs, sessions.reset_index(drop=True), incomplete.reindex(columns=columns).reset_index(drop=True))


def assign_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """``variant``: empty when a method has one group in a setting; otherwise the config values that
    differ between its groups there (``method.lr=0.01, ...``), so that a sweep gives one row per value."""
    runs = runs.assign(variant="")
    if runs.empty:
        return runs
    for _, cluster in runs.groupby(["method", *SETTING], sort=False):
        groups = cluster.drop_duplicates("group_id")
        if len(groups) < 2:
            continue
        configs = {g: c if isinstance(c, dict) else None for g, c in zip(groups["group_id"], groups["config"])}
        known = [c for c in configs.values() if c is not None]
        keys = sorted(set().union(*known)) if known else []
        differing = [k for k in keys if len({c.get(k, "<unset>") for c in known}) > 1]
        for group_id, config in configs.items():
            if config is None:
                label = f"group {group_id} (no {CONFIG_FILE})"
            elif not differing:
                label = f"group {group_id}"
            else:
                label = ", ".join(f"{k}={config.get(k, '<unset>')}" for k in differing)
            runs.loc[runs["group_id"] == group_id, "variant"] = label
    return runs


# ---------------------------------------------------------------------------------------------
# Cells: one per (method, variant, setting, metric)


def summarize(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN with one seed) and number of seeds of each metric per group."""
    keys = ROW + SETTING + ["group_id"]
    present = [m for m in metrics if m in runs.columns]  # older CSVs may lack a column
    long = runs.melt(id_vars=keys + ["seed", "run_dir"], value_vars=present, var_name="metric")
    long = long.dropna(subset=["value"])
    cells = (
        long.groupby(keys + ["metric"], sort=False)
        .agg(
            mean=("value", "mean"),
            std=("value", lambda v: v.std(ddof=1)),
            n=("value", "size"),
            seeds=("seed", lambda s: ";".join(map(str, sorted(s)))),
            run_dirs=("run_dir", lambda d: ";".join(sorted(d))),
        )
        .reset_index()
    )
    cells["unit"] = cells["metric"].map(lambda m: METRICS[m].unit)
    return cells[ROW + SETTING + ["metric", "unit", "mean", "std", "n", "seeds", "group_id", "run_dirs"]]


def _ordered(values: Iterable[str], wanted: Sequence[str] | None, preferred: Sequence[str] = ()) -> list[str]:
    present = list(dict.fromkeys(values))
    if wanted:
        return [v for v in wanted if v in present]
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(present, key=lambda v: (rank.get(v, len(rank)), v))


def select(
    cells: pd.DataFrame,
    methods=None,
    datasets=None,
    backbones=None,
    scenarios=None,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> pd.DataFrame:
    """Keep and order rows (methods), settings and metrics; lists also fix the order."""
    orders = {
        "method": _ordered(cells["method"], methods, METHOD_ORDER),
        "dataset": _ordered(cells["dataset"], datasets),
        "backbone": _ordered(cells["backbone"], backbones),
        "scenario": _ordered(cells["scenario"], scenarios, _scenario_sort(cells["scenario"])),
        "metric": [m for m in metrics if m in set(cells["metric"])],
    }
    out = cells
    sort_keys = []
    for column, order in orders.items():
        out = out[out[column].isin(order)]
        out = out.assign(**{f"_{column}": out[column].map({v: i for i, v in enumerate(order)})})
        sort_keys.append(f"_{column}")
    out = out.sort_values(["_method", "variant", "_dataset", "_backbone", "_scenario", "_metric"])
    return out.drop(columns=sort_keys).reset_index(drop=True)


def _scenario_sort(names: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple:
        digits = "".join(c if c.isdigit() else " " for c in name).split()
        return tuple(int(d) for d in digits) + (name,)

    return sorted(set(names), key=key)


# ---------------------------------------------------------------------------------------------
# Published numbers


def read_published(path: str | Path) -> pd.DataFrame:
    """``published.csv``: method, dataset, backbone, scenario, metric, value[, source, note, session]."""
    path = Path(path)
    if not path.exists():
        raise TablesError(f"published numbers not found: {path} (pass --compare PATH)")
    table = pd.read_csv(path, dtype={"source": str, "note": str})
    missing = {"method", "dataset", "backbone", "scenario", "metric", "value"} - set(table.columns)
    if missing:
        raise TablesError(f"{path} lacks the column(s) {', '.join(sorted(missing))}")
    for column in ("source", "note"):
        table[column] = table.get(column, pd.Series("", index=table.index)).fillna("")
    table["session"] = pd.to_numeric(table.get("session", pd.Series(np.nan, index=table.index)), errors="coerce")
    return table


def attach_published(cells: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Adds ``published`` (the first matching row of the file), ``diff`` = ours − published,
    ``published_source``/``published_note`` and ``published_others`` (other values for that cell)."""
    keys = ["method", "dataset", "backbone", "scenario", "metric"]
    summary = published[published["session"].isna()]
    first = summary.drop_duplicates(keys, keep="first")
    others = (
        summary[summary.duplicated(keys, keep="first")]
        .assign(text=lambda d: d["value"].map("{:g}".format) + " (" + d["source"] + ")")
        .groupby(keys)["text"]
        .agg("; ".join)
        .rename("published_others")
        .reset_index()
    )
    first = first.rename(columns={"value": "published", "source": "published_source", "note": "published_note"})
    out = cells.drop(
        columns=[
            c
            for c in ("published", "published_source", "published_note", "published_others", "diff")
            if c in cells.columns
        ]
    )
    out = out.merge(first[keys + ["published", "published_source", "published_note"]], on=keys, how="left")
    out = out.merge(others, on=keys, how="left")
    out["diff"] = out["mean"] - out["published"]
    return out


def unmatched(cells: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Our cells whose metric is one published.csv reports but which have no published counterpart."""
    reported = set(published.loc[published["session"].isna(), "metric"])
    return cells[cells["metric"].isin(reported) & cells["published"].isna()]


# ---------------------------------------------------------------------------------------------
# Rendering


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
    header, spans = [], []
    for setting in settings:
        start = len(header)
        for metric in metrics:
            label = METRICS[metric].latex if latex else METRICS[metric].markdown
            header.append(label)
            if setting + (metric,) in compared:
                header += ["pub." if latex else f"{label} pub.", r"$\Delta$" if latex else f"{label} Δ"]
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
                    line.append(mean or empty)
                if setting + (metric,) in compared:
                    line.append((cell is not None and _fmt(cell["published"], digits)) or empty)
                    line.append((cell is not None and _fmt(cell["diff"], digits, signed=True)) or empty)
            n = seeds.get((method, variant, *setting))
            line.append(str(n) if n else empty)
        body.append(line)
    return _Grid(rows, spans, varying, header, body)


def _setting_label(setting: tuple, dims: Sequence[str], pretty: bool = False) -> str:
    parts = [setting[SETTING.index(d)] for d in dims]
    return " ".join(PRETTY.get(p, p) if pretty else p for p in parts)


def to_markdown(cells: pd.DataFrame, digits: int = 2) -> str:
    """A pipe table: one row per method (and variant); per setting and metric ``mean ± std``, the
    best mean per column in bold; ``n`` = seeds; with published values, ``pub.`` and ``Δ`` columns."""
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
    if "published" in cells.columns:
        note += "; pub. = published value (first match in the published file), Δ = ours − published"
    head = (f"Setting: {caption}\n" if caption else "") + f"({note})\n\n"
    return head + "\n".join([lines[0], rule] + lines[1:]) + "\n"


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


def to_latex(cells: pd.DataFrame, digits: int = 2, caption: str | None = None, label: str = "tab:results") -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): a header row per setting with
    ``\\cmidrule``s, then metric names; best mean per column in ``\\textbf``; std in ``\\scriptsize``."""
    if cells.empty:
        return "% no results\n"
    grid = _grid(cells, digits, latex=True)
    header, spans, rows, body = grid.header, grid.spans, grid.rows, grid.body
    _, settings, _, _ = _layout(cells)
    dims = grid.varying if len(settings) > 1 else SETTING
    constant = [d for d in SETTING if d not in dims]
    if caption is None:
        caption = r"Mean $\pm$ sample std over seeds ($n$ seeds); best mean per column in bold."
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
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects directly: no pyplot state, PNG through Agg)

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
    """The accuracy matrix ``R[k, j]`` of one run from its ``matrix.csv`` (NaN above the diagonal)."""
    path = Path(run_dir) / MATRIX_FILE
    if not path.exists():
        raise TablesError(f"{path} not found (--heatmap takes a run directory)")
    long = pd.read_csv(path)
    size = int(max(long["session"].max(), long["block"].max())) + 1
    R = np.full((size, size), np.nan)
    R[long["session"].to_numpy(), long["block"].to_numpy()] = long["acc"].to_numpy()
    return R


def plot_heatmap(run_dir: str | Path, out_dir: Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Heat map of one run's accuracy matrix, cell values written in when there are at most 12
    sessions (at 7 pt more do not fit a column). Rows: after session k; columns: classes of session j
    (both 1-based, as in papers)."""
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
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("test classes of session j")
        ax.set_ylabel("after session k")
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


# ---------------------------------------------------------------------------------------------
# Command line


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
        default=",".join(DEFAULT_METRICS),
        help=f"comma list of {', '.join(METRICS)} (default: %(default)s)",
    )
    parser.add_argument("--digits", type=int, default=2, help="decimals shown (default: %(default)s)")
    parser.add_argument(
        "--compare",
        nargs="?",
        const=str(DEFAULT_PUBLISHED),
        metavar="PUBLISHED_CSV",
        help=f"add published values and ours − published (default file: {DEFAULT_PUBLISHED})",
    )
    parser.add_argument("--plots", action="store_true", help="accuracy-vs-classes curves per setting (PNG, SVG)")
    parser.add_argument(
        "--heatmap",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="accuracy-matrix heat map of this run (PNG, SVG); repeatable",
    )
    parser.add_argument("--caption", help="LaTeX caption (default: says what the cells are)")
    parser.add_argument("--label", default="tab:results", help="LaTeX label (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and Path(args.compare).is_dir():  # `--compare RESULTS_DIR`: the flag took a results dir
        args.results.append(args.compare)
        args.compare = str(DEFAULT_PUBLISHED)
    if not args.results:
        parser.error("give at least one results directory")
    try:
        return _main(args)
    except TablesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    metrics = _list(args.metrics) or DEFAULT_METRICS
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise TablesError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    out_dir = Path(args.out) if args.out else Path(args.results[0]) / "tables"
    results = load_results(args.results)
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
            columns=ROW + SETTING + ["metric", "unit", "mean", "std", "n", "seeds", "group_id", "run_dirs"]
        )
    )
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

    markdown = to_markdown(cells, args.digits)
    report = [markdown]
    if published is not None:
        report.append(_unmatched_report(unmatched(cells, published)))
    report.append(_incomplete_report(results.incomplete))
    text = "\n".join(r for r in report if r)
    print(text, end="")
    written = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv", out_dir / "incomplete.csv"]
    written[0].write_text(text)
    written[1].write_text(to_latex(cells, args.digits, args.caption, args.label))
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


if __name__ == "__main__":
    sys.exit(main())
