"""pilot.tables on bad input: damaged or hand-edited CSVs, runs that share a directory, groups whose
runs differ, paths with nothing in them.

Every case checks the outcome (exit status, or the warning and what is left out of the table), that
the message names the file (or run directories) and the problem, and that the input files are
byte for byte what they were: the table builder only reads. Runs are written with pilot's own
``CsvSink`` (so the layout is exactly a real run's), with ``config.yaml`` and ``sessions.json``
beside them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml

from pilot import tables
from pilot.sinks.csv import SESSION_COLUMNS, CsvSink

GROUP = "g0000000000a"


def make_run(
    run_dir: Path,
    *,
    seed: int,
    acc: list[float],
    num_sessions: int | None = None,
    group_id: str = GROUP,
    increment: int = 10,
    config: bool = True,
    run_id: str | None = None,
) -> Path:
    """A run directory as the run loop leaves it: sessions.csv and matrix.csv through ``CsvSink``,
    config.yaml, sessions.json. ``acc`` is the accuracy after each finished session."""
    total = num_sessions or len(acc)
    info = {
        "run_id": run_id or f"r{seed:04d}{group_id[:7]}",
        "group_id": group_id,
        "method": "simplecil",
        "dataset": "cifar100",
        "backbone": "vit_b16_in1k",
        "scenario": "B0Inc10",
        "seed": seed,
        "num_sessions": total,
    }
    run_dir.mkdir(parents=True)
    sink = CsvSink()
    sink.open(run_dir, info, {}, [])
    for k, a in enumerate(acc):
        record = {
            "session": k,
            "n_seen": increment * (k + 1),
            "n_new": increment,
            "acc": float(a),
            "acc_top5": 99.0,
            "acc_old": float("nan") if k == 0 else float(a) - 1,
            "acc_new": float(a) + 1,
            "acc_avg": float(np.mean(acc[: k + 1])),
            "forgetting": float("nan") if k == 0 else 2.0,
            "bwt": float("nan") if k == 0 else -2.0,
            "n_test": 100 * (k + 1),
            "train_time_s": 10.0,
            "eval_time_s": 1.0,
            "wall_time_s": 11.0,
            "elapsed_s": 11.0 * (k + 1),
            "peak_mem_mb": 512.0,
            "params_total": 1000,
            "params_trainable": 10,
            "finished_at": f"2026-01-01T00:0{k}:00+00:00",
        }
        matrix = [{"session": k, "block": j, "acc": float(a), "n_test": 100} for j in range(k + 1)]
        sink.write(record, matrix)
    sink.close({})
    if config:
        cfg = {
            "seed": seed,
            "labels": {"method": "simplecil", "dataset": "cifar100", "backbone": "vit_b16_in1k"},
            "scenario": {"init_cls": increment, "increment": increment, "order_seed": seed},
            "method": {"_target_": "pilot.learners.simplecil.SimpleCIL", "batch_size": 128},
            "paths": {"results_dir": str(run_dir.parent)},
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "sessions.json").write_text(json.dumps(info))
    return run_dir


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def run_tables(capsys, root: Path, out: Path, *args: str) -> tuple[int, str, str]:
    """``python -m pilot.tables ROOT --out OUT ARGS``, checking that nothing under ROOT changed."""
    before = snapshot(root) if root.exists() else {}
    capsys.readouterr()
    code = tables.main([str(root), "--out", str(out), *args])
    captured = capsys.readouterr()
    assert (snapshot(root) if root.exists() else {}) == before, "pilot.tables changed its input files"
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# Editing a sessions.csv the way a person, a crash or a second run would


def read_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(), newline="")))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # \r\n, as CsvSink writes
    path.write_text(buffer.getvalue(), newline="")


def set_cell(line: int, column: str, value: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        rows = read_rows(path)
        rows[line - 1][rows[0].index(column)] = value
        write_rows(path, rows)

    return edit


def drop_column(column: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        rows = read_rows(path)
        i = rows[0].index(column)
        write_rows(path, [r[:i] + r[i + 1 :] for r in rows])

    return edit


def cut_mid_row(path: Path) -> None:  # an interrupted write: the last row loses its tail and line break
    path.write_bytes(path.read_bytes()[:-60])


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def header_only(path: Path) -> None:
    write_rows(path, read_rows(path)[:1])


def matrix_header(path: Path) -> None:  # matrix.csv copied over sessions.csv
    path.write_bytes((path.parent / "matrix.csv").read_bytes())


def no_header(path: Path) -> None:
    write_rows(path, read_rows(path)[1:])


def rows_of_two_runs(path: Path) -> None:
    """Two runs started into one directory: their rows interleave (here seed 2 and seed 3)."""
    other = make_run(path.parent.parent.parent / "other_run", seed=3, acc=[60.0, 50.0, 40.0])  # not under results
    mine, theirs = read_rows(path), read_rows(other / "sessions.csv")
    write_rows(path, [mine[0]] + [row for pair in zip(mine[1:], theirs[1:]) for row in pair])


def rows_overwritten(path: Path) -> None:
    """Two runs writing one file at the same offsets: each row is whole, but session 1 is the other run's."""
    other = make_run(path.parent.parent.parent / "other_run", seed=3, acc=[60.0, 50.0, 40.0])
    mine, theirs = read_rows(path), read_rows(other / "sessions.csv")
    write_rows(path, [mine[0], mine[1], theirs[2], mine[3]])


def repeated_session(path: Path) -> None:  # session 1 twice, with another accuracy
    rows = read_rows(path)
    again = list(rows[2])
    again[rows[0].index("acc")] = "12.0000"
    write_rows(path, rows + [again])


def exact_duplicate(path: Path) -> None:
    rows = read_rows(path)
    write_rows(path, rows + [rows[2]])


def missing_middle_session(path: Path) -> None:
    rows = read_rows(path)
    write_rows(path, [rows[0], rows[1], rows[3]])


def extra_field(path: Path) -> None:
    rows = read_rows(path)
    rows[2].append("7")
    write_rows(path, rows)


def joined_files(path: Path) -> None:  # `cat a/sessions.csv b/sessions.csv > sessions.csv`
    rows = read_rows(path)
    write_rows(path, rows[:2] + [rows[0]] + rows[2:])


def other_sessions_json(path: Path) -> None:  # another run rewrote the description beside the rows
    info = json.loads((path.parent / "sessions.json").read_text())
    (path.parent / "sessions.json").write_text(json.dumps({**info, "run_id": "someone_else"}))


def other_config_seed(path: Path) -> None:
    config = yaml.safe_load((path.parent / "config.yaml").read_text())
    (path.parent / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 7}))


def not_utf8(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"simplecil", b"simpl\xe9cil", 1))


def num_sessions_changes(path: Path) -> None:
    set_cell(4, "num_sessions", "5")(path)


# (case id, edit of the second run's sessions.csv, the problem the message must state)
FILE_CASES = [
    ("cut_mid_row", cut_mid_row, rf"line 4 is cut off mid-row \(\d+ of {len(SESSION_COLUMNS)} fields"),
    ("missing_column", drop_column("acc"), r"the header lacks column\(s\) acc\b"),
    ("non_numeric_acc", set_cell(3, "acc", "abc"), r"line 3: acc='abc' is not a number"),
    ("acc_above_100", set_cell(3, "acc", "123.5"), r"line 3: acc=123.5 is outside 0\.\.100"),
    ("acc_below_0", set_cell(2, "acc", "-3"), r"line 2: acc=-3 is outside 0\.\.100"),
    ("acc_empty", set_cell(4, "acc", ""), r"line 4: acc is empty"),
    ("empty_file", empty_file, r"is empty \(0 bytes\)"),
    ("wrong_header_matrix", matrix_header, r"lacks column\(s\) n_seen, acc_avg \(this looks like a matrix\.csv\)"),
    ("no_header", no_header, r"line 1 is not a sessions\.csv header"),
    ("rows_of_two_runs", rows_of_two_runs, r"holds rows of 2 runs \(run_id r0002\S+ on lines 2, 4, 6; run_id r0003"),
    (
        "rows_overwritten",
        rows_overwritten,
        r"holds rows of 2 runs \(run_id r0002\S+ on lines 2, 4; run_id r0003\S+ on line 3\)",
    ),
    ("session_twice_differing", repeated_session, r"session 1 appears on lines 3 and 5 with different values"),
    ("session_missing", missing_middle_session, r"session\(s\) 1 missing \(found 0, 2"),
    ("extra_field", extra_field, rf"line 3 has {len(SESSION_COLUMNS) + 1} fields, the header {len(SESSION_COLUMNS)}"),
    ("joined_files", joined_files, r"line 3 repeats the header \(two files joined\?\)"),
    ("fractional_session", set_cell(3, "session", "1.5"), r"line 3: session=1\.5 is not a whole number"),
    ("session_past_end", set_cell(4, "session", "3"), r"session\(s\) 2 missing.*session 3 is past num_sessions=3"),
    (
        "num_sessions_changes",
        num_sessions_changes,
        r"num_sessions changes between rows \(3 on lines 2, 3; 5 on line 4\)",
    ),
    ("not_utf8", not_utf8, r"is not UTF-8 text"),
    ("other_sessions_json", other_sessions_json, r"sessions\.json beside it is of run_id someone_else"),
    ("other_config_seed", other_config_seed, r"config\.yaml beside it has seed 7: another run wrote"),
]


@pytest.fixture
def two_seeds(tmp_path) -> Path:
    """One group, seeds 1 and 2, 3 sessions each: A_last 80 and 70."""
    root = tmp_path / "results"
    make_run(root / "run_s1", seed=1, acc=[90.0, 85.0, 80.0])
    make_run(root / "run_s2", seed=2, acc=[88.0, 79.0, 70.0])
    return root


@pytest.mark.parametrize("edit, problem", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_sessions_csv_is_left_out_and_named(two_seeds, tmp_path, capsys, edit, problem):
    bad = two_seeds / "run_s2" / "sessions.csv"
    edit(bad)
    code, out, err = run_tables(capsys, two_seeds, tmp_path / "out", "--metrics", "acc_last")
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith(f"warning: {bad.resolve()}: "))
    assert re.search(problem, warning), warning
    assert warning.endswith("the run is left out")
    # The table is the good run alone: never a mean over a bad file.
    cells = pd.read_csv(tmp_path / "out" / "table.csv", dtype={"seeds": str})
    assert cells[["mean", "n", "seeds"]].values.tolist() == [[80.0, 1, "1"]]
    left_out = pd.read_csv(tmp_path / "out" / "incomplete.csv")
    assert left_out["run_dir"].tolist() == [str(bad.parent.resolve())]
    assert left_out["reason"].item().startswith("bad sessions.csv: ") and re.search(problem, left_out["reason"].item())
    assert f"{bad.parent.resolve()}" in out and "bad sessions.csv" in out  # the printed list of runs left out


def test_the_library_issues_a_tables_warning(two_seeds):
    set_cell(3, "acc", "n/a")(two_seeds / "run_s2" / "sessions.csv")
    with pytest.warns(tables.TablesWarning, match=r"run_s2/sessions\.csv: line 3: acc='n/a' is not a number"):
        results = tables.load_results([two_seeds])
    assert results.runs["seed"].tolist() == [1]
    assert len(results.warnings) == 1 and "run_s2" in results.warnings[0]


def test_many_problems_in_one_file_make_one_message(two_seeds, tmp_path, capsys):
    bad = two_seeds / "run_s2" / "sessions.csv"
    for line in (2, 3, 4):
        set_cell(line, "acc", "x")(bad)
    set_cell(2, "n_seen", "-1")(bad)
    write_rows(bad, read_rows(bad) + [read_rows(bad)[3]])  # a 4th bad line
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1
    assert f"{bad.resolve()}: line 2: n_seen=-1 is outside >= 1; acc='x' is not a number; line 3:" in warnings[0]
    assert "and 1 more problem(s)" in warnings[0]


def test_an_exact_duplicate_row_counts_once(two_seeds, tmp_path, capsys):
    exact_duplicate(two_seeds / "run_s2" / "sessions.csv")
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out", "--metrics", "acc_last")
    assert code == 0
    assert f"{(two_seeds / 'run_s2' / 'sessions.csv').resolve()}: line 5 repeats line 3 (session 1) exactly" in err
    cells = pd.read_csv(tmp_path / "out" / "table.csv", dtype={"seeds": str})
    assert cells[["mean", "n", "seeds"]].values.tolist() == [[75.0, 2, "1;2"]]


def test_a_header_only_file_is_a_run_without_a_finished_session(two_seeds, tmp_path, capsys):
    header_only(two_seeds / "run_s2" / "sessions.csv")
    code, out, err = run_tables(capsys, two_seeds, tmp_path / "out")
    assert code == 0
    assert f"warning: {(two_seeds / 'run_s2' / 'sessions.csv').resolve()}: has a header but no rows" in err
    assert "sessions 0/3  (no session finished (header only))" in out


def test_invalid_config_yaml_is_reported_and_the_run_still_counts(two_seeds, tmp_path, capsys):
    (two_seeds / "run_s2" / "config.yaml").write_text("seed: [1\n")
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out", "--metrics", "acc_last")
    assert code == 0
    assert f"{(two_seeds / 'run_s2' / 'config.yaml').resolve()}: is not valid YAML" in err
    assert pd.read_csv(tmp_path / "out" / "table.csv", dtype={"seeds": str})["n"].tolist() == [2]


# ---------------------------------------------------------------------------------------------
# Groups whose runs turn out to differ: split by config, or refused


def test_a_group_with_different_num_sessions_is_split_by_config(tmp_path, capsys):
    """The reported bug: two runs with one group_id, 3 and 2 sessions, were averaged (41.50 ± 44.55)."""
    root = tmp_path / "results"
    make_run(root / "a", seed=1, acc=[30.0, 20.0, 10.0], increment=10)
    make_run(root / "b", seed=2, acc=[90.0, 73.0], increment=20)
    code, out, err = run_tables(capsys, root, tmp_path / "out", "--metrics", "acc_last")
    assert code == 0
    assert "41.50" not in out
    message = next(line for line in err.splitlines() if line.startswith("warning: group_id"))
    a, b = (root / "a").resolve(), (root / "b").resolve()
    assert f"group_id {GROUP} holds runs of 2 configurations" in message
    assert f"num_sessions: 3 ({a}) vs 2 ({b})" in message
    assert f"scenario.increment: 10 ({a}) vs 20 ({b})" in message and "split into 2 rows" in message
    cells = pd.read_csv(tmp_path / "out" / "table.csv", dtype={"seeds": str}).set_index("variant")
    assert cells["mean"].to_dict() == {
        "scenario.increment=10, scenario.init_cls=10": 10.0,
        "scenario.increment=20, scenario.init_cls=20": 73.0,
    }
    assert set(cells["n"]) == {1} and set(cells["group_id"]) == {f"{GROUP}~1", f"{GROUP}~2"}


@pytest.mark.parametrize(
    "case, why",
    [
        ("same_config", "their config.yaml files are the same, so the rows cannot be told apart"),
        ("no_config", "some runs have no readable config.yaml to tell them apart"),
        ("seed_twice", "a seed appears in more than one run"),
    ],
)
def test_a_group_that_config_cannot_untangle_is_refused(tmp_path, capsys, case, why):
    root = tmp_path / "results"
    make_run(root / "a", seed=1, acc=[30.0, 20.0, 10.0])
    if case == "seed_twice":  # the same seed in one group under two run_ids: a hand-made copy
        make_run(root / "b", seed=1, acc=[90.0, 80.0, 73.0], run_id="copied")
        difference = f"seed 1 twice ({(root / 'a').resolve()}, {(root / 'b').resolve()})"
    else:
        make_run(root / "b", seed=2, acc=[90.0, 73.0], config=case != "no_config")
        difference = f"num_sessions: 3 ({(root / 'a').resolve()}) vs 2 ({(root / 'b').resolve()})"
    code, out, err = run_tables(capsys, root, tmp_path / "out", "--metrics", "acc_last")
    assert code == 1  # nothing left to tabulate
    message = next(line for line in err.splitlines() if line.startswith("warning: group_id"))
    assert f"group_id {GROUP} is not averaged" in message and difference in message and why in message
    assert str((root / "a").resolve()) in message and str((root / "b").resolve()) in message
    left_out = pd.read_csv(tmp_path / "out" / "incomplete.csv")
    assert len(left_out) == 2 and left_out["reason"].str.startswith(f"refused: group_id {GROUP} mixes").all()
    assert "no finished runs match" in err


def test_seeds_are_still_averaged_when_nothing_differs(two_seeds):
    results = tables.load_results([two_seeds])
    assert sorted(results.runs["seed"]) == [1, 2] and results.warnings == []
    assert set(results.runs["group_id"]) == {GROUP}  # the class-order seed follows the seed: no split


# ---------------------------------------------------------------------------------------------
# Nothing usable: exit status 2


def test_every_file_bad_exits_2_and_lists_each(two_seeds, tmp_path, capsys):
    empty_file(two_seeds / "run_s1" / "sessions.csv")
    set_cell(3, "acc", "101")(two_seeds / "run_s2" / "sessions.csv")
    code, out, err = run_tables(capsys, two_seeds, tmp_path / "out")
    assert code == 2 and out == ""
    assert err.startswith(f"error: no usable sessions.csv under {two_seeds} (2 found, none with a readable row)")
    assert f"{(two_seeds / 'run_s1' / 'sessions.csv').resolve()}: is empty (0 bytes)" in err
    assert f"{(two_seeds / 'run_s2' / 'sessions.csv').resolve()}: line 3: acc=101 is outside 0..100" in err
    assert not (tmp_path / "out").exists()


def test_only_header_only_files_exit_2(two_seeds, tmp_path, capsys):
    for seed in (1, 2):
        header_only(two_seeds / f"run_s{seed}" / "sessions.csv")
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out")
    assert code == 2 and "no usable sessions.csv" in err and "has a header but no rows" in err


def test_no_sessions_csv_under_the_directory_exits_2(tmp_path, capsys):
    root = tmp_path / "results"
    (root / "run").mkdir(parents=True)
    (root / "run" / "config.yaml").write_text("seed: 1\n")
    code, _, err = run_tables(capsys, root, tmp_path / "out")
    assert code == 2 and f"error: no sessions.csv found under {root}" in err


def test_a_directory_that_does_not_exist_exits_2(tmp_path, capsys):
    code, _, err = run_tables(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nowhere'} does not exist"


def test_a_file_that_is_not_a_sessions_csv_exits_2(two_seeds, tmp_path, capsys):
    path = two_seeds / "run_s1" / "matrix.csv"
    before = path.read_bytes()
    assert tables.main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {path} is a file, not a results directory" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_bad_matrix_csv_for_the_heatmap_exits_2(two_seeds, tmp_path, capsys):
    matrix = two_seeds / "run_s1" / "matrix.csv"
    rows = read_rows(matrix)
    rows[2][rows[0].index("block")] = "2"  # session 1, block 2: a block not yet seen
    write_rows(matrix, rows)
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out", "--heatmap", str(two_seeds / "run_s1"))
    assert code == 2
    assert f"error: {matrix}: line 3: block 2 > session 1" in err


def test_a_bad_published_csv_exits_2(two_seeds, tmp_path, capsys):
    published = tmp_path / "published.csv"
    published.write_text(
        "method,dataset,backbone,scenario,metric,value\nsimplecil,cifar100,vit_b16_in1k,B0Inc10,acc_last,~80\n"
    )
    before = published.read_bytes()
    code, _, err = run_tables(capsys, two_seeds, tmp_path / "out", "--compare", str(published))
    assert code == 2 and f"error: {published}: value is missing or not a number on line 2 ('~80')" in err
    assert published.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Sessions are numbered from 0 in the plots too


def test_heatmap_axes_number_sessions_from_0(two_seeds, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_tables(capsys, two_seeds, out, "--plots", "--heatmap", str(two_seeds / "run_s1"))
    assert code == 0
    svg = (out / "heatmap_run_s1.svg").read_text()
    assert "after session k (from 0)" in svg and "test classes of session j (from 0)" in svg
    numbers = re.findall(r">(\d+)</text>", svg)  # x ticks, y ticks, then the colour bar's 0, 20, ..., 100
    assert numbers[:6] == ["0", "1", "2", "0", "1", "2"] and numbers[6:] == ["0", "20", "40", "60", "80", "100"]
    assert pd.read_csv(out / "curves.csv")["session"].tolist() == [0, 1, 2]  # as in sessions.csv


def test_groups_with_equal_configs_stay_separate_rows(tmp_path, capsys):
    """Three groups of one method and setting; two have the same config.yaml (their group_ids differ,
    e.g. written by another pilot version): three rows, never two groups in one cell."""
    root = tmp_path / "results"
    make_run(root / "a", seed=1, acc=[90.0, 80.0], group_id="group_a")
    make_run(root / "b", seed=1, acc=[90.0, 40.0], group_id="group_b")
    make_run(root / "c", seed=1, acc=[90.0, 60.0], group_id="group_c", increment=20)
    code, _, _ = run_tables(capsys, root, tmp_path / "out", "--metrics", "acc_last")
    assert code == 0
    cells = pd.read_csv(tmp_path / "out" / "table.csv")
    assert dict(zip(cells["variant"], cells["mean"])) == {
        "scenario.increment=10, scenario.init_cls=10, group group_a": 80.0,
        "scenario.increment=10, scenario.init_cls=10, group group_b": 40.0,
        "scenario.increment=20, scenario.init_cls=20": 60.0,
    }
