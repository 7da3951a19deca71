"""Published numbers: reading ``results/published.csv`` and matching it to our cells.

``read_published`` loads the file (method, dataset, backbone, scenario, metric, value and optional
source, note, session), ``attach_published`` adds the published value and ours − published to each
table cell, and ``unmatched`` lists the cells of a reported metric that have no published
counterpart. ``DEFAULT_PUBLISHED`` is the file ``--compare`` reads when given no path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pilot.resources import shipped_dir
from pilot.tables.results import TablesError

DEFAULT_PUBLISHED = shipped_dir("results", "published.csv") / "published.csv"  # the packaged copy in a wheel


def read_published(path: str | Path) -> pd.DataFrame:
    """``published.csv``: method, dataset, backbone, scenario, metric, value[, source, note, session]."""
    path = Path(path)
    if not path.exists():
        raise TablesError(f"published numbers not found: {path} (pass --compare PATH)")
    try:
        table = pd.read_csv(path, dtype={"source": str, "note": str})
    except pd.errors.EmptyDataError:
        raise TablesError(f"{path}: is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise TablesError(f"{path}: cannot be read as CSV ({str(err).strip().splitlines()[-1]})") from None
    missing = {"method", "dataset", "backbone", "scenario", "metric", "value"} - set(table.columns)
    if missing:
        raise TablesError(f"{path} lacks the column(s) {', '.join(sorted(missing))}")
    values = pd.to_numeric(table["value"], errors="coerce")
    bad = table.index[values.isna()]
    if len(bad):  # file line = row + 2 (the header, 1-based)
        shown = ", ".join(f"line {i + 2} ({table['value'][i]!r})" for i in bad[:3])
        raise TablesError(f"{path}: value is missing or not a number on {shown}" + (", ..." if len(bad) > 3 else ""))
    table["value"] = values
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
