"""Reading pilot's result directories and turning runs into table cells.

Finds every run directory (one holding a ``sessions.csv``) under the given paths, checks and reads
each run's rows, ``sessions.json`` and flattened ``config.yaml``, sets apart the runs that cannot be
averaged (``load_results`` -> ``Results``), labels groups of one method and setting that differ in
their config as variants (``assign_variants``), and reduces the runs of each seed group to cells:
mean, sample std and number of seeds per metric (``summarize``), filtered and ordered by ``select``;
``select_by`` keeps only the best sweep point by validation score. Also holds what the other
``pilot.tables`` modules share: file names, row/setting keys, ``METRICS``, ``TablesError`` and
``TablesWarning``.

What is checked, and what happens then
--------------------------------------

A table cell averages runs that differ only by their seed, and a bad file must never slip into one.
Inputs are only read, never changed. Every message names the file (or the run directories) and the
problem; ``load_results`` issues them as ``TablesWarning`` (the command line prints them as
``warning: ...`` lines on stderr) and keeps them in ``Results.warnings``.

*One file* (``check_sessions``). A ``sessions.csv`` with any of these problems is **left out**: its
run is listed under "Not in the table" (``incomplete.csv``) with the problem as the reason, never
averaged, and one warning gives the file and its first problems:

* it cannot be read, is not UTF-8 text, is empty (0 bytes) or holds NUL bytes;
* a wrong header: not a ``sessions.csv`` header at all, a column pilot needs is missing
  (``REQUIRED_COLUMNS``; other columns are optional, as in older files), a column named twice;
* a row cut short (the file ends mid-row: an interrupted write or copy), a row with more or fewer
  fields than the header, the header repeated inside the file (two files joined);
* a value that is not a number where one is expected, an empty required value, a percentage outside
  0..100 (``forgetting``, ``bwt``: -100..100), a negative count, time or memory, a fractional
  session/seed/count;
* rows of more than one run (``run_id``) in the file: two runs wrote into one directory. The rows are
  not split into two runs, because the ``config.yaml`` and ``sessions.json`` beside them describe
  only one of them (one directory holds one run);
* a run column (``group_id``, labels, ``seed``, ``num_sessions``) that changes between rows;
* the same session twice with different values, a session missing in the middle (0, 1, 3), a session
  at or past ``num_sessions``, ``n_seen`` that does not grow with the session;
* rows that disagree with the run description beside them (``sessions.json``'s ``run_id``,
  ``config.yaml``'s seed or labels): another run wrote into the directory.

Two cases are milder. The same row twice, byte for byte, is counted once, with a warning (nothing is
ambiguous). A file with a header and no rows is a run whose first session has not finished: it is
listed as such, with a warning. A ``config.yaml`` that is not valid YAML gets a warning; the run is
still tabulated, but its config cannot be compared (see below).

*One group* (``check_groups``, runs with the same ``group_id``, whose seeds are averaged). The runs
must agree on method, dataset, backbone, scenario and ``num_sessions``, on their ``config.yaml``
(values that follow the seed, such as the class-order seed, left aside), and each seed may appear
once. ``group_id`` hashes all of that, so a disagreement means a file was edited or copied by hand.
They must also have run on the same data and started from the same backbone weights: ``data_hash``
and ``weights_hash`` (columns of newer files) are not in ``group_id``, so one config run on two
versions of a dataset shares a ``group_id``. A hash that is missing or empty (older files, an
image-folder dataset without a manifest) is unknown and matches anything; two different known values
in one group are a disagreement, treated like a config difference, with the hash as the differing
value (the parts' rows are named ``data_hash=...``), and refused when a run's hash is unknown.

* **Split**, with a warning, when every run of the group has a ``config.yaml`` and the configs tell
  the runs apart: each part becomes its own group (``<group_id>~1``, ``~2``, ...) and so its own
  table row, labelled by the differing config values, exactly as a sweep is. The config is the
  better witness of what a run computed than a hash copied into its rows.
* **Refused** otherwise: a run has no readable ``config.yaml``, or identical configs come with
  different ``num_sessions`` or labels, or a seed appears twice (also within a part of a split).
  Every run of the group is listed with the reason and nothing of it is averaged, since which runs
  belong together cannot be told.

Runs of one method and setting in different groups (a sweep) are never merged either: each group is
its own row (``assign_variants``), unless ``select_by`` keeps only the sweep point with the best
validation score (``--select-by acc_val``). Incomplete runs and superseded reruns of the same
``run_id`` are listed apart, as before.

*Evaluation protocol.* Each run's ``eval_protocol`` (newer files) travels to its cells, so that the
renderers can mark numbers whose predictions depended on the test batch (:func:`protocol_mark`).

*Exit status* of ``python -m pilot.tables``: 2 when nothing usable is found (a given path does not
exist, no ``sessions.csv`` under the paths, or every ``sessions.csv`` found is bad or has no rows:
``load_results`` raises ``TablesError`` listing each file and its problem); otherwise the table is
built from the good files, the bad ones are warned about and listed, and the status is 0, or 1 when
no finished run is left to tabulate.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import yaml

from pilot.provenance import NON_SEMANTIC_KEYS, SEMANTIC_RUNTIME_KEYS, drop_later_defaults
from pilot.sinks.csv import MATRIX_COLUMNS, RUN_COLUMNS, RUN_EXTRA_COLUMNS, SESSION_COLUMNS

SESSIONS_FILE, MATRIX_FILE, CONFIG_FILE, SPLIT_FILE = "sessions.csv", "matrix.csv", "config.yaml", "sessions.json"
SETTING = ["dataset", "backbone", "scenario"]
ROW = ["method", "variant"]
# Known methods first, in this order; any other method follows alphabetically.
METHOD_ORDER = [
    "finetune",  # the classic learners on the same backbone (LAMDA-PILOT's baselines) first
    "icarl",
    "coil",
    "der",
    "foster",
    "memo",
    "dgr",
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
    "lae",
    "cofima",
    "duct",
]

# What a sessions.csv row must hold for a table, and what its values may be (pilot.sinks.csv writes them).
REQUIRED_COLUMNS = [*RUN_COLUMNS, "session", "n_seen", "acc", "acc_avg"]
_TEXT_COLUMNS = {"run_id", "group_id", "method", "dataset", "backbone", "scenario", "finished_at", *RUN_EXTRA_COLUMNS}
HASH_COLUMNS = ("data_hash", "weights_hash")  # runs averaged together must agree on these where known
_INTEGER_COLUMNS = {
    "seed",
    "num_sessions",
    "session",
    "block",
    "n_seen",
    "n_new",
    "n_test",
    "params_total",
    "params_trainable",
}
_BOUNDS = {  # inclusive (low, high); None = unbounded
    **{c: (0.0, 100.0) for c in ("acc", "acc_top5", "acc_old", "acc_new", "acc_avg", "acc_val", "acc_val_avg")},
    **{c: (0.0, 100.0) for c in ("acc_nme", "acc_nme_avg")},
    **{c: (-100.0, 100.0) for c in ("forgetting", "bwt")},
    **{c: (0.0, None) for c in ("train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "peak_mem_mb")},
    **{c: (0.0, None) for c in ("session", "n_new", "n_test", "params_total", "params_trainable")},
    **{c: (1.0, None) for c in ("num_sessions", "n_seen")},
    "seed": (None, None),
}
_SHOWN_PROBLEMS = 3  # per file; the rest are counted


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
    "acc_val": Metric("acc_val", "A_val", r"$A^\mathrm{val}_\mathrm{last}$", "%", True),
    "acc_val_avg": Metric("acc_val_avg", "Ā_val", r"$\bar{A}^\mathrm{val}$", "%", True),
    # Nearest-mean-of-exemplars classification (learners with an exemplar memory; LAMDA-PILOT's NME curve).
    "acc_nme_avg": Metric("acc_nme_avg", "Ā NME", r"$\bar{A}^\mathrm{NME}$", "%", True),
    "acc_nme": Metric("acc_nme", "A_last NME", r"$A^\mathrm{NME}_\mathrm{last}$", "%", True),
}
NME_METRICS = ["acc_nme_avg", "acc_nme"]  # added to the default metrics when a tabulated run has NME scores
SELECT_CRITERIA = ("acc_val", "acc_val_avg")  # metrics --select-by may choose sweep points with
DEFAULT_METRICS = ["acc_avg", "acc_last"]


class TablesError(Exception):
    """Bad input to the table builder (nothing found, unknown metric...): printed, exit status 2."""


class TablesWarning(UserWarning):
    """A result file or group that is left out of (or split in) the table; the table is still built."""


# ---------------------------------------------------------------------------------------------
# Finding and checking one run's files


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``paths`` that holds a ``sessions.csv`` (each directory once). A path may
    also be a ``sessions.csv`` itself; a path that does not exist or another file is a ``TablesError``."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise TablesError(f"{path} does not exist")
        if path.is_file():
            if path.name != SESSIONS_FILE:
                raise TablesError(f"{path} is a file, not a results directory (give the directory that holds runs)")
            files = [path]
        else:
            try:
                files = sorted(path.rglob(SESSIONS_FILE))
            except OSError as err:
                raise TablesError(f"{path} cannot be searched ({err})") from err
        for file in files:
            if file.is_file():
                found.setdefault(file.parent.resolve(), None)
    return list(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _lines(numbers: Sequence[int]) -> str:
    """``line 3`` or ``lines 2, 4, 6`` (at most 5 listed)."""
    shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
    return f"line {shown}" if len(numbers) == 1 else f"lines {shown}"


@dataclass(frozen=True)
class CsvSpec:
    """What a result CSV must look like: its file name, the columns pilot writes, those a table needs
    (with a value, except ``may_be_empty``), and the allowed range of each numeric column (inclusive;
    None = open)."""

    name: str
    columns: Sequence[str]
    required: Sequence[str]
    bounds: dict[str, tuple[float | None, float | None]]
    may_be_empty: frozenset[str] = frozenset()


SESSIONS_SPEC = CsvSpec(SESSIONS_FILE, SESSION_COLUMNS, REQUIRED_COLUMNS, _BOUNDS)
MATRIX_SPEC = CsvSpec(
    MATRIX_FILE,
    MATRIX_COLUMNS,
    ["session", "block", "acc"],
    {**{c: _BOUNDS[c] for c in ("seed", "num_sessions", "session", "acc", "n_test", "acc_nme")}, "block": (0.0, None)},
    frozenset({"acc"}),  # a block without test images has no accuracy
)
Record = tuple[int, dict[str, Any], tuple[str, ...]]  # line number, parsed values, the stripped fields


def _parse_value(column: str, raw: str, spec: CsvSpec) -> tuple[Any, str]:
    """The value of one cell and a problem ("" when fine). Empty (or ``nan``) optional numbers are NaN,
    as pilot writes undefined metrics."""
    value = raw.strip()
    required = column in spec.required and column not in spec.may_be_empty
    if column in _TEXT_COLUMNS or column not in spec.bounds:
        return value, f"{column} is empty" if required and not value else ""
    if not value or value.lower() == "nan":
        return math.nan, f"{column} is empty" if required else ""
    try:
        number = float(value)
    except ValueError:
        return math.nan, f"{column}={value!r} is not a number"
    if not math.isfinite(number):
        return math.nan, f"{column}={value} is not finite"
    if column in _INTEGER_COLUMNS:
        if not number.is_integer():
            return math.nan, f"{column}={value} is not a whole number"
        number = int(number)
    low, high = spec.bounds[column]
    if (low is not None and number < low) or (high is not None and number > high):
        span = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
        return math.nan, f"{column}={value} is outside {span}"
    return number, ""


def read_records(path: str | Path, spec: CsvSpec) -> tuple[list[str], list[Record], list[str]]:
    """Read a result CSV line by line: ``(header, well-formed rows, problems)``. Problems are about the
    file (unreadable, empty, wrong header) or a line (cut off, wrong width, a repeated header, a value
    that is not a number or out of range), each with its line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        return [], [], [f"cannot be read ({err.strerror or err})"]
    if not data.strip():
        return [], [], ["is empty (0 bytes)" if not data else "is empty (only blank lines)"]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return [], [], [f"is not UTF-8 text (byte {err.start}): not a CSV written by pilot"]
    if "\0" in text:
        return [], [], ["holds NUL bytes (a damaged or binary file)"]
    reader = csv.reader(io.StringIO(text, newline=""))
    lines: list[tuple[int, list[str]]] = []
    try:
        for fields in reader:
            lines.append((reader.line_num, fields))
    except csv.Error as err:
        return [], [], [f"line {reader.line_num + 1} cannot be parsed as CSV ({err})"]
    lines = [(n, f) for n, f in lines if f]  # blank lines carry nothing
    (header_line, raw_header), body = lines[0], lines[1:]
    header = [h.strip() for h in raw_header]
    if not set(header) & set(spec.columns):
        found, expected = ",".join(header[:3]), ",".join(spec.columns[:3])
        return (
            [],
            [],
            [f"line {header_line} is not a {spec.name} header (found {found!r}..., expected {expected!r}...)"],
        )
    problems = []
    twice = [c for c, n in Counter(header).items() if n > 1]
    if twice:
        problems.append(f"the header names column(s) {', '.join(twice)} twice")
    missing = [c for c in spec.required if c not in header]
    if missing:
        other = MATRIX_FILE if spec.name == SESSIONS_FILE else SESSIONS_FILE
        look_alike = set(MATRIX_SPEC.columns if spec.name == SESSIONS_FILE else SESSIONS_SPEC.columns)
        hint = f" (this looks like a {other})" if set(header) <= look_alike and len(set(header)) > 3 else ""
        problems.append(f"the header lacks column(s) {', '.join(missing)}{hint}")
    if problems:
        return header, [], problems

    records: list[Record] = []
    cut = not text.endswith(("\n", "\r"))
    for i, (line, fields) in enumerate(body):
        stripped = tuple(f.strip() for f in fields)
        if list(stripped) == header:
            problems.append(f"line {line} repeats the header (two files joined?)")
            continue
        if len(fields) != len(header):
            if cut and i == len(body) - 1 and len(fields) < len(header):
                problems.append(
                    f"line {line} is cut off mid-row ({len(fields)} of {len(header)} fields, no line break at "
                    "the end of the file: an interrupted write or copy)"
                )
            else:
                problems.append(f"line {line} has {len(fields)} fields, the header {len(header)}")
            continue
        record, errors = {}, []
        for column, raw in zip(header, fields):
            record[column], error = _parse_value(column, raw, spec)
            if error:
                errors.append(error)
        if errors:
            problems.append(f"line {line}: {'; '.join(errors)}")
        else:
            records.append((line, record, stripped))
    return header, records, problems


def check_sessions(path: str | Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Read one ``sessions.csv`` and check it: ``(rows, problems, notes)``.

    ``rows`` are the parsed rows, sorted by session (exact duplicate rows once); ``problems`` say why
    the run must not be tabulated (empty when it may); ``notes`` are harmless findings worth a warning.
    See the module docstring for the list of checks."""
    header, records, problems = read_records(path, SESSIONS_SPEC)
    if problems or not records:
        return _frame([r for _, r, _ in records], header), problems, []
    problems, notes, records = _check_rows(records)
    return _frame([r for _, r, _ in records], header), problems, notes


def _check_rows(records: list[Record]) -> tuple[list[str], list[str], list[Record]]:
    """Checks across the well-formed rows of one file: one run, constant run columns, sessions 0..k-1
    each once, within num_sessions, n_seen growing. Exact duplicate rows are dropped (with a note)."""
    problems, notes = [], []
    by_run: dict[str, list[int]] = defaultdict(list)
    for line, record, _ in records:
        by_run[record["run_id"]].append(line)
    if len(by_run) > 1:
        runs = "; ".join(f"run_id {run_id} on {_lines(lines)}" for run_id, lines in by_run.items())
        return [f"holds rows of {len(by_run)} runs ({runs}): two runs wrote into one directory"], [], records
    extra = [c for c in RUN_EXTRA_COLUMNS if c in records[0][1]]  # optional: older files lack them
    for column in RUN_COLUMNS[1:] + extra:
        values: dict[Any, list[int]] = defaultdict(list)
        for line, record, _ in records:
            values[record[column]].append(line)
        if len(values) > 1:
            problems.append(
                f"{column} changes between rows ({'; '.join(f'{v} on {_lines(ls)}' for v, ls in values.items())})"
            )
    kept, first_of = [], {}
    for line, record, raw in records:
        session = record["session"]
        if session not in first_of:
            first_of[session] = (line, record, raw)
            kept.append((line, record, raw))
            continue
        first_line, first, first_raw = first_of[session]
        if raw == first_raw:
            notes.append(f"line {line} repeats line {first_line} (session {session}) exactly: counted once")
        else:
            differ = [c for c in first if c != "finished_at" and not _same(first[c], record[c])][:2] or ["finished_at"]
            pairs = ", ".join(f"{c} {first[c]} vs {record[c]}" for c in differ)
            problems.append(
                f"session {session} appears on lines {first_line} and {line} with different values ({pairs})"
            )
    if problems:
        return problems, notes, kept
    kept.sort(key=lambda r: r[1]["session"])
    sessions = [r["session"] for _, r, _ in kept]
    gaps = sorted(set(range(sessions[-1] + 1)) - set(sessions))
    if gaps:
        problems.append(
            f"session(s) {', '.join(map(str, gaps))} missing (found {', '.join(map(str, sessions))}; "
            "sessions are numbered 0, 1, 2, ... with no gap)"
        )
    total = kept[0][1]["num_sessions"]
    if sessions[-1] >= total:
        problems.append(f"session {sessions[-1]} is past num_sessions={total} (sessions are numbered 0..{total - 1})")
    n_seen = [r["n_seen"] for _, r, _ in kept]
    shrinking = [kept[i][0] for i in range(1, len(kept)) if n_seen[i] <= n_seen[i - 1]]
    if shrinking:
        problems.append(f"n_seen does not grow with the session ({_lines(shrinking)})")
    return problems, notes, kept


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _frame(records: list[dict[str, Any]], header: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=header)
    for column in ("run_id", "group_id"):
        if column in frame:
            frame[column] = frame[column].astype(str)
    return frame.reset_index(drop=True)


def known_value(value: Any) -> str | None:
    """A run-level text value (a hash, the evaluation protocol) as a string, or None when it is
    unknown: missing, empty, NaN (a column older files lack)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text if text and text.lower() != "nan" else None


def _summary(problems: list[str]) -> str:
    """A file's first problems in one line, and how many more there are."""
    more = len(problems) - _SHOWN_PROBLEMS
    return "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; and {more} more problem(s)" if more > 0 else "")


def _load_config(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The raw ``config.yaml`` and a problem ("" when fine or absent)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, ""
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot be read ({err})"
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return None, f"is not valid YAML ({str(err).splitlines()[0]})"
    if not isinstance(config, dict):
        return None, "does not hold a config (not a mapping)"
    return config, ""


def _flat_config(config: dict[str, Any] | None, seed: Any) -> dict[str, str] | None:
    """The resolved config as ``{dotted.key: value}`` with what does not define the setting removed
    (exactly what ``provenance.config_hash`` leaves out, and the seed)."""
    if not isinstance(config, dict):
        return None
    config = {k: v for k, v in drop_later_defaults(config).items() if k not in NON_SEMANTIC_KEYS and k != "seed"}
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


def _mismatch_with_description(rows: pd.DataFrame, split: dict[str, Any], config: dict[str, Any] | None) -> str:
    """Why the rows are not the run that ``sessions.json``/``config.yaml`` beside them describe ("" if they are)."""
    first = rows.iloc[0]
    if split.get("run_id") is not None and str(split["run_id"]) != first["run_id"]:
        return (
            f"its rows are of run_id {first['run_id']} but {SPLIT_FILE} beside it is of run_id {split['run_id']}: "
            "another run wrote into this directory"
        )
    if config is None:
        return ""
    if "seed" in config and str(config["seed"]) != str(first["seed"]):
        return (
            f"its rows have seed {first['seed']} but {CONFIG_FILE} beside it has seed {config['seed']}: "
            "another run wrote into this directory"
        )
    found = config.get("labels")
    labels = found if isinstance(found, dict) else {}
    for key in ("method", "dataset", "backbone"):
        if key in labels and str(labels[key]) != str(first[key]):
            return (
                f"its rows have {key} {first[key]} but {CONFIG_FILE} beside it has labels.{key} {labels[key]}: "
                "another run wrote into this directory"
            )
    return ""


def read_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """One run: a summary dict (labels, seed, sessions done/total, ``problem`` when it cannot be
    averaged, ``bad`` when that is a file problem, ``warnings`` naming files, the config flattened)
    and its checked ``sessions.csv`` rows (empty when the file is bad)."""
    run_dir = Path(run_dir)
    path = run_dir / SESSIONS_FILE
    info: dict[str, Any] = {"run_dir": str(run_dir), "problem": "", "bad": False, "warnings": []}
    split = _read_json(run_dir / SPLIT_FILE)
    for key in ("run_id", "group_id", "method", "dataset", "backbone", "scenario", "seed", "num_sessions"):
        info[key] = split.get(key)
    rows, problems, notes = check_sessions(path)
    config, config_problem = _load_config(run_dir / CONFIG_FILE)
    if not problems and len(rows):
        mismatch = _mismatch_with_description(rows, split, config)
        problems = [mismatch] if mismatch else []
    for key in RUN_EXTRA_COLUMNS:
        info[key] = known_value(split.get(key))
    if len(rows):
        first = rows.iloc[0]
        for key in RUN_COLUMNS:
            info[key] = first[key].item() if hasattr(first[key], "item") else first[key]
        for key in RUN_EXTRA_COLUMNS:
            if key in rows.columns:
                info[key] = known_value(first[key])
    info["sessions_done"] = int(rows["session"].nunique()) if len(rows) else 0
    info["finished_at"] = str(rows["finished_at"].iloc[-1]) if len(rows) and "finished_at" in rows else ""
    info["config"] = _flat_config(config, info.get("seed"))
    if problems:
        info.update(problem=f"bad {SESSIONS_FILE}: {_summary(problems)}", bad=True)
        info["warnings"].append(f"{path}: {_summary(problems)}; the run is left out")
        return info, pd.DataFrame()
    info["warnings"] += [f"{path}: {note}" for note in notes]
    if config_problem:
        info["warnings"].append(
            f"{run_dir / CONFIG_FILE}: {config_problem}; the run is tabulated, but its config cannot be compared"
        )
    total = info["num_sessions"]
    if not len(rows):
        info["problem"] = "no session finished (header only)"
        known = "" if total is not None else f" (and no {SPLIT_FILE}: num_sessions unknown)"
        info["warnings"].append(f"{path}: has a header but no rows: no session has finished{known}")
    elif info["sessions_done"] < int(total):
        info["problem"] = "incomplete"
    return info, rows.assign(run_dir=str(run_dir))


# ---------------------------------------------------------------------------------------------
# All runs: complete runs, groups of seeds, and what is left out


@dataclass
class Results:
    """What was found under the results directories."""

    runs: pd.DataFrame  # complete, averaged runs: one row per run, last-session metrics, ``variant``
    sessions: pd.DataFrame  # every sessions.csv row of those runs
    incomplete: pd.DataFrame  # runs that are not averaged, with ``reason``
    warnings: list[str] = field(default_factory=list)  # every message issued while loading


def _warn(message: str) -> None:
    warnings.warn(message, TablesWarning, stacklevel=3)


def load_results(paths: Iterable[str | Path], warn: Callable[[str], None] | None = None) -> Results:
    """Read and check every run under ``paths``; set apart incomplete, bad, superseded and refused runs.

    Each message (a bad file, a split or refused group...) goes to ``warn`` (default: a
    ``TablesWarning``). ``TablesError`` when nothing is found or no ``sessions.csv`` has usable rows."""
    paths = list(paths)
    warn = warn or _warn
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise TablesError(
            f"no {SESSIONS_FILE} found under {', '.join(map(str, paths))} (each run writes one into its run directory)"
        )
    infos, frames, messages = [], [], []
    for run_dir in run_dirs:
        info, rows = read_run(run_dir)
        messages += info.pop("warnings")
        if not info["problem"]:
            for name, metric in METRICS.items():
                if metric.column in rows.columns:
                    values = pd.to_numeric(rows[metric.column], errors="coerce")
                    value = values.max() if metric.reduce == "max" else values.iloc[-1]
                    info[name] = float(value) * metric.scale
            info["num_sessions"] = int(rows["num_sessions"].iloc[-1])
            frames.append(rows)
        if info["sessions_done"] and not info["bad"]:
            info["usable"] = True
        infos.append(info)
    if not any(info.get("usable") for info in infos):
        raise TablesError(
            f"no usable {SESSIONS_FILE} under {', '.join(map(str, paths))} ({len(infos)} found, none with a "
            "readable row):\n  " + "\n  ".join(messages)
        )
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
    runs, refused, group_messages = check_groups(runs.reset_index(drop=True))
    messages += group_messages
    incomplete = pd.concat([incomplete, superseded, refused], ignore_index=True)
    for message in messages:
        warn(message)
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
    return Results(
        runs, sessions.reset_index(drop=True), incomplete.reindex(columns=columns).reset_index(drop=True), messages
    )


_GROUP_COLUMNS = ["method", *SETTING, "num_sessions"]


def _seed_keys(group: pd.DataFrame) -> set[str]:
    """Config keys whose value is each run's own seed (they follow the seed, not the setting)."""
    configs = [(c, str(s)) for c, s in zip(group["config"], group["seed"]) if isinstance(c, dict)]
    if not configs:
        return set()
    return {k for k in configs[0][0] if all(c.get(k) == seed for c, seed in configs)}


def _conflicting_hashes(group: pd.DataFrame) -> dict[str, list[str | None]]:
    """The hash columns (``data_hash``, ``weights_hash``) with two or more different known values in
    the group, each with every run's value (None where unknown)."""
    found = {}
    for column in HASH_COLUMNS:
        if column not in group:
            continue
        values = [known_value(v) for v in group[column]]
        if len({v for v in values if v is not None}) > 1:
            found[column] = values
    return found


def _differences(group: pd.DataFrame, comparable: list[dict[str, str] | None], hashes: Sequence[str] = ()) -> list[str]:
    """What differs between the runs of a group, as ``key: value (run dirs) vs value (run dirs)``,
    with the conflicting ``hashes`` (read from the runs, so also where a config is missing)."""
    found = []
    columns = {c: [str(v) for v in group[c]] for c in _GROUP_COLUMNS}
    columns |= {h: [known_value(v) or "<unknown>" for v in group[h]] for h in hashes}
    known = [c for c in comparable if c is not None]
    keys = sorted(set().union(*known) - set(hashes)) if known else []
    columns |= {
        k: [c.get(k, "<unset>") if c is not None else f"<no {CONFIG_FILE}>" for c in comparable]
        for k in keys
        if len({c.get(k, "<unset>") for c in known}) > 1
    }
    for key, values in columns.items():
        if len(set(values)) < 2:
            continue
        where: dict[str, list[str]] = defaultdict(list)
        for value, run_dir in zip(values, group["run_dir"]):
            where[value].append(run_dir)
        found.append(f"{key}: " + " vs ".join(f"{v} ({', '.join(d)})" for v, d in where.items()))
    for seed, runs in group.groupby("seed", sort=False):
        if len(runs) > 1:
            times = "twice" if len(runs) == 2 else f"{len(runs)} times"
            found.append(f"seed {seed} {times} ({', '.join(runs['run_dir'])})")
    return found


def check_groups(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Make sure each ``group_id`` holds runs of one configuration (module docstring): returns the runs
    to tabulate (split groups get ``group_id`` ``<id>~1``, ``~2``...), the refused runs with ``reason``,
    and the warnings."""
    if runs.empty:
        return runs, runs.assign(reason=pd.Series(dtype=str)), []
    kept, refused, messages = [], [], []
    for group_id, group in runs.groupby("group_id", sort=False):
        group = group.sort_values("run_dir")  # a stable order for messages and parts
        seed_keys = _seed_keys(group)
        hashes = _conflicting_hashes(group)  # {column: each run's value, None = unknown}
        unknown_hash = [k for k, values in hashes.items() if None in values]
        comparable = [
            {k: v for k, v in c.items() if k not in seed_keys}
            | {k: values[i] or "<unknown>" for k, values in hashes.items()}
            if isinstance(c, dict)
            else None
            for i, c in enumerate(group["config"])
        ]
        signatures = [None if c is None else tuple(sorted(c.items())) for c in comparable]
        mixed = len(group[_GROUP_COLUMNS].drop_duplicates()) > 1 or len({s for s in signatures if s is not None}) > 1
        if not mixed and not hashes and not group["seed"].duplicated().any():
            kept.append(group)
            continue
        differences = "; ".join(_differences(group, comparable, list(hashes)))
        mixes = "runs on different data or backbone weights" if hashes else "configurations"
        parts = [group[[s == signature for s in signatures]] for signature in dict.fromkeys(signatures)]
        splittable = (
            None not in signatures
            and not unknown_hash
            and len(parts) > 1
            and all(len(p[_GROUP_COLUMNS].drop_duplicates()) == 1 and not p["seed"].duplicated().any() for p in parts)
        )
        if splittable:
            for k, part in enumerate(parts, 1):
                labelled = [
                    {**c, **{h: run[h] for h in hashes}} for c, (_, run) in zip(part["config"], part.iterrows())
                ]
                kept.append(part.assign(group_id=f"{group_id}~{k}", config=labelled))
            held = "runs on different data or backbone weights" if hashes else f"runs of {len(parts)} configurations"
            messages.append(
                f"group_id {group_id} holds {held} ({differences}): split into {len(parts)} rows named by the "
                "differing values"
            )
            continue
        if unknown_hash:
            why = f"some runs have no {' or '.join(unknown_hash)} to tell them apart"
        elif None in signatures:
            why = f"some runs have no readable {CONFIG_FILE} to tell them apart"
        elif len(parts) == 1 and group["seed"].duplicated().any():
            why = "a seed appears in more than one run"
        elif len(parts) == 1:
            why = f"their {CONFIG_FILE} files are the same, so the rows cannot be told apart"
        else:
            why = f"even runs with the same {CONFIG_FILE} differ or repeat a seed"
        reason = f"refused: group_id {group_id} mixes {mixes} ({differences}); {why}"
        refused.append(group.assign(reason=reason))
        what = " (runs on different data or backbone weights)" if hashes else ""
        messages.append(f"group_id {group_id}{what} is not averaged ({differences}): {why}")
    keep = pd.concat(kept, ignore_index=True) if kept else runs.iloc[:0]
    out = pd.concat(refused, ignore_index=True) if refused else runs.iloc[:0].assign(reason=pd.Series(dtype=str))
    return keep, out, messages


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
        labels = {}
        for group_id, config in configs.items():
            if config is None:
                labels[group_id] = f"group {group_id} (no {CONFIG_FILE})"
            elif not differing:
                labels[group_id] = f"group {group_id}"
            else:
                labels[group_id] = ", ".join(f"{k}={config.get(k, '<unset>')}" for k in differing)
        repeated = {label for label, n in Counter(labels.values()).items() if n > 1}
        for group_id, label in labels.items():  # two groups with equal configs: still two rows, never one cell
            runs.loc[runs["group_id"] == group_id, "variant"] = (
                f"{label}, group {group_id}" if label in repeated else label
            )
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
    cells["eval_protocol"] = cells["group_id"].map(_group_protocols(runs))
    cells["memory"] = cells["group_id"].map(_group_memory(runs)).fillna("")
    return cells[
        ROW
        + SETTING
        + ["metric", "unit", "mean", "std", "n", "seeds", "group_id", "run_dirs", "eval_protocol", "memory"]
    ]


def memory_label(config: Any) -> str:
    """The exemplar memory a run's flattened config describes: ``"2000"`` (``method.memory_size``, a total
    shared by the seen classes), ``"20/class"`` (``method.fixed_memory`` with ``method.memory_per_class``),
    ``""`` for a learner without a memory (none of the keys)."""
    if not isinstance(config, dict) or "method.memory_size" not in config and "method.fixed_memory" not in config:
        return ""
    if str(config.get("method.fixed_memory")).lower() == "true":
        return f"{config.get('method.memory_per_class', '?')}/class"
    return str(config.get("method.memory_size", "?"))


def _group_memory(runs: pd.DataFrame) -> dict[str, str]:
    """Per group, the memory label of its runs' config (they share it: the config is in group_id)."""
    if "config" not in runs:
        return {}
    return {group_id: memory_label(configs.iloc[0]) for group_id, configs in runs.groupby("group_id")["config"]}


def default_metrics(runs: pd.DataFrame) -> list[str]:
    """:data:`DEFAULT_METRICS`, and the NME metrics when a run has nearest-mean-of-exemplars scores."""
    has_nme = any(m in runs and runs[m].notna().any() for m in NME_METRICS)
    return DEFAULT_METRICS + (NME_METRICS if has_nme else [])


def _group_protocols(runs: pd.DataFrame) -> dict[str, str]:
    """Per group, its runs' known evaluation protocols ("; "-joined; "" when unknown, as in older files)."""
    if "eval_protocol" not in runs:
        return {}
    return {
        group_id: "; ".join(sorted({v for v in map(known_value, protocols) if v is not None}))
        for group_id, protocols in runs.groupby("group_id", sort=False)["eval_protocol"]
    }


# Marks for cells whose predictions depended on the test batch (see protocol_mark).
SORTED_BATCH_MARK, SHUFFLED_BATCH_MARK = "†", "‡"
PROTOCOL_NOTES = {
    SORTED_BATCH_MARK: (
        "predictions depend on the class-sorted test batch. Batch-wise prompt voting (L2P, DualPrompt): the test "
        "batch votes for the prompt, which leaks label information; per-sample numbers: "
        "method.batchwise_prompt_eval=false. Adapter drift (MOS, as the reference): stored adapters move toward the "
        "mean of earlier ones at every test batch, so scores depend on the number and order of test batches; "
        "per-sample numbers: method.adapter_drift=false"
    ),
    SHUFFLED_BATCH_MARK: (
        "batch-dependent predictions on shuffled test batches (scenario.shuffle_test=true): no class-sorted "
        "batches to leak labels, but a sample's prediction still depends on the samples batched with it"
    ),
}


def protocol_mark(protocol: Any) -> str:
    """The mark of a cell evaluated with ``protocol`` (its ``eval_protocol``; several joined by "; "):
    ``†`` when predictions depend on the batch and test batches are class-sorted, ``‡`` when they depend
    on the batch on shuffled batches, "" when per-sample or unknown (older files)."""
    found = ""
    for part in (known_value(protocol) or "").split(";"):
        learner, _, order = part.strip().partition(",")
        if not learner or learner.strip() == "per-sample":
            continue
        if order.strip() == "shuffled":
            found = found or SHUFFLED_BATCH_MARK
        else:
            return SORTED_BATCH_MARK
    return found


# ---------------------------------------------------------------------------------------------
# Choosing sweep points by validation score


@dataclass(frozen=True)
class Selection:
    """One choice of ``select_by``: in ``key`` (method, dataset, backbone, scenario) the sweep point
    ``variant`` won on ``criterion``; ``points`` = every candidate as (variant, mean score, seeds)."""

    key: tuple[str, str, str, str]
    criterion: str
    variant: str
    group_id: str
    points: tuple[tuple[str, float, int], ...]

    def describe(self, digits: int = 2) -> str:
        def point(variant: str, score: float, n: int) -> str:
            value = "no score" if math.isnan(score) else f"{score:.{digits}f}, {n} seed{'s' * (n != 1)}"
            return f"{variant or 'default'} ({value})"

        others = [point(*p) for p in self.points if p[0] != self.variant]
        chosen = next(p for p in self.points if p[0] == self.variant)
        return f"{' · '.join(self.key)}: {point(*chosen)} over {', '.join(others)}"


def select_by(runs: pd.DataFrame, criterion: str) -> tuple[pd.DataFrame, list[Selection], list[str]]:
    """Keep, per method and setting, the sweep point with the best mean ``criterion`` over its seeds.

    Sweep points are the groups of one method, dataset, backbone and scenario whose configs differ only
    in ``method.*`` values (hyperparameters); groups that also differ elsewhere (precision, transforms,
    ``scenario.*``...) are chosen among separately. ``criterion`` is ``acc_val`` (validation top-1 after
    the last session) or ``acc_val_avg`` (its mean over sessions); higher wins, a tie goes to the first
    variant in sorted order. A pool of one point is kept as it is; a pool where no point has a score
    (runs without ``scenario.val_fraction``) is left out, with a note. Returns the runs kept, the
    choices made and the notes."""
    if criterion not in SELECT_CRITERIA:
        raise TablesError(f"--select-by {criterion}: choose one of {', '.join(SELECT_CRITERIA)}")
    if runs.empty:
        return runs, [], []
    kept, selections, notes = [], [], []
    scores = runs[criterion] if criterion in runs else pd.Series(math.nan, index=runs.index)

    def pool_of(config: Any, group_id: str) -> Any:
        if not isinstance(config, dict):
            return f"<no config> {group_id}"
        return repr(sorted((k, v) for k, v in config.items() if not k.startswith("method.") and k not in HASH_COLUMNS))

    pools = runs.assign(_pool=[pool_of(c, g) for c, g in zip(runs["config"], runs["group_id"])], _score=scores)
    for (method, *setting), cluster in pools.groupby(["method", *SETTING], sort=False):
        for _, pool in cluster.groupby("_pool", sort=False):
            points = []
            for group_id, group in pool.groupby("group_id", sort=False):
                values = pd.to_numeric(group["_score"], errors="coerce").dropna()
                mean = float(values.mean()) if len(values) else math.nan
                points.append((group["variant"].iloc[0], mean, len(values), group_id))
            if len(points) == 1:
                kept.append(pool)
                continue
            points.sort(key=lambda p: p[0])
            scored = [p for p in points if not math.isnan(p[1])]
            key = (method, *setting)
            if not scored:
                notes.append(
                    f"{' · '.join(key)}: none of its {len(points)} sweep points has a {criterion} (runs need "
                    "scenario.val_fraction > 0), so none is selected and the row is left out"
                )
                continue
            best = max(scored, key=lambda p: p[1])  # the first of equal scores
            kept.append(pool[pool["group_id"] == best[3]])
            selections.append(Selection(key, criterion, best[0], best[3], tuple((v, m, n) for v, m, n, _ in points)))
    out = pd.concat(kept) if kept else pools.iloc[:0]
    return out.drop(columns=["_pool", "_score"]).sort_index(), selections, notes


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
