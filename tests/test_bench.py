"""scripts/bench.py works end to end (on a CPU with the test ViT; its numbers are checked on a GPU)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_appends_one_row_per_learner_and_data_kind(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # importable by name: JPEG writers run in a process pool
    bench = importlib.import_module("bench")
    out = tmp_path / "bench.csv"
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--methods",
        "simplecil,l2p",
        "--data",
        "synthetic,jpeg",
        "--jpeg-dir",
        str(tmp_path / "jpeg"),
        "--out",
        str(out),
    ]
    assert bench.main(args) == 0
    rows = pd.read_csv(out)
    assert list(rows.columns) == bench.COLUMNS
    assert rows[["method", "data"]].values.tolist() == [
        ["simplecil", "synthetic"],
        ["l2p", "synthetic"],
        ["simplecil", "jpeg"],
        ["l2p", "jpeg"],
        ["simplecil", "synthetic-cifar100-b0inc10-run"],
    ]
    learners = rows.iloc[:4]
    assert (learners["train_images"] == 2 * 16).all() and (learners["test_images"] == 4 * 8).all()
    assert (learners["eval_ips"] > 0).all() and (learners["feature_ips"] > 0).all()
    assert learners["train_ips"].isna().tolist() == [True, False, True, False]  # SimpleCIL does not train
    assert rows["whole_run_s"].iloc[-1] > 0 and rows["device"].eq("cpu").all()
    assert len(list((tmp_path / "jpeg" / "train").glob("*/*.jpg"))) == 4 * 16
    assert (
        bench.main(args[:-2] + ["--out", str(out), "--no-whole-run", "--methods", "slca", "--data", "synthetic"]) == 0
    )
    assert len(pd.read_csv(out)) == 6  # appended, header kept
    assert "not comparable with the targets" in capsys.readouterr().out


def test_table_estimate_follows_the_formula(monkeypatch):
    """``--table``: per session t, N_t * E / train_ips, plus the end-of-session share of fit, plus the seen
    test images at eval_ips; first-session-only learners train in session 0 and pay a prototype pass later."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = importlib.import_module("bench")
    rates = {"train_ips": 1000.0, "fit_ips": 500.0, "eval_ips": 2000.0, "feature_ips": 4000.0, "device": "gpu"}
    rows = pd.DataFrame(
        [
            {"method": "l2p", "data": "synthetic", "note": "", **rates},
            {"method": "aper_adapter", "data": "synthetic", "note": "trains in session 0 only: ...", **rates},
        ]
    )
    table = bench.estimate_table(rows, ["l2p", "aper_adapter", "coda"], seeds=3).set_index("method")
    n, seen = 10 * 500, [1000 * (t + 1) for t in range(10)]  # CIFAR-100 B0Inc10
    l2p = sum(n * 5 / 500 + s / 2000 for s in seen)  # 5 epochs; fit_ips covers training and end of session
    aper = n * 20 / 500 + sum(s / 2000 + n / 4000 for s in seen)  # 20 epochs in session 0, prototypes every session
    assert table.loc["l2p", "run_s"] == pytest.approx(l2p) and table.loc["l2p", "total_s"] == pytest.approx(3 * l2p)
    assert table.loc["aper_adapter", "run_s"] == pytest.approx(aper)
    assert np.isnan(table.loc["coda", "run_s"]) and table.loc["coda", "note"] == "no row"
