"""scripts/bench.py works end to end (on a CPU with the test ViT; its numbers are checked on a GPU)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd

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
