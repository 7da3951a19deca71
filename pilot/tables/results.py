"""Reading pilot's result directories and turning runs into table cells.

Finds every run directory (one holding a ``sessions.csv``) under the given paths, reads each run's
rows, ``sessions.json`` and flattened ``config.yaml``, sets incomplete and superseded runs apart
(``load_results`` -> ``Results``), labels groups of one method and setting that differ in their
config as variants (``assign_variants``), and reduces the runs of each seed group to cells: mean,
sample std and number of seeds per metric (``summarize``), filtered and ordered by ``select``. Also
holds what the other ``pilot.tables`` modules share: file names, row/setting keys, ``METRICS`` and
``TablesError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml

from pilot.run_info import NON_SEMANTIC_KEYS, SEMANTIC_RUNTIME_KEYS

SESSIONS_FILE, MATRIX_FILE, CONFIG_FILE, SPLIT_FILE = "sessions.csv", "matrix.csv", "config.yaml", "sessions.json"
SETTING = ["dataset", "backbone", "scenario"]
ROW = ["method", "variant"]
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
