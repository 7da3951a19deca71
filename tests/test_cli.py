"""`python -m pilot.train` as a user runs it: exit codes, messages, multirun, the printed summary."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
FAST = ["backbone=vit_test_tiny", "dataset=synthetic", "logger=csv", "runtime.progress=false"]


def pilot_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "pilot.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_run_prints_the_csv_numbers_and_a_final_summary(tmp_path):
    proc = pilot_train("+method=simplecil", *FAST, "scenario=b0inc5", f"paths.results_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.endswith("_simplecil_synthetic_s1993")
    sessions = pd.read_csv(run_dir / "sessions.csv")
    log = (run_dir / "train.log").read_text()
    for row in sessions.itertuples():
        assert f"session {row.session} ({row.session + 1}/2) | classes {row.n_seen:4d} | acc {row.acc:5.2f}" in log
    assert (
        f"Final: acc_last {sessions['acc'].iloc[-1]:.2f}  acc_avg {sessions['acc_avg'].iloc[-1]:.2f}"
        in proc.stdout + proc.stderr
    )


def test_offline_cifar100_stops_within_seconds_with_instructions(tmp_path):
    start = time.perf_counter()
    proc = pilot_train(
        "+method=simplecil",
        "dataset=cifar100",
        "scenario=b0inc10",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.results_dir={tmp_path}",
        "logger=csv",
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    if "cannot be reached" in out:  # offline (CI): no download possible
        assert "dataset.root=<that folder>" in out and "Traceback" not in out
        assert elapsed < 60


def test_bad_input_exits_with_status_2_and_one_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = pilot_train("+method=simplecil", *FAST, f"paths.results_dir={blocker}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not writable (Not a directory)" in proc.stderr and "Traceback" not in proc.stderr
    proc = pilot_train(*FAST, f"paths.results_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "No method chosen" in proc.stdout + proc.stderr


def test_multirun_over_seeds_writes_one_run_per_seed(tmp_path):
    proc = pilot_train(
        "-m",
        "+method=simplecil",
        *FAST,
        "scenario=b0inc5",
        "seed=1993,1994",
        f"paths.results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted((next((tmp_path / "multirun").iterdir())).glob("*_simplecil_synthetic_s*"))
    assert [r.name for r in runs] == ["0_simplecil_synthetic_s1993", "1_simplecil_synthetic_s1994"]
    tables = [pd.read_csv(r / "sessions.csv") for r in runs]
    assert [t["seed"].iloc[0] for t in tables] == [1993, 1994]
    assert tables[0]["group_id"].iloc[0] == tables[1]["group_id"].iloc[0]
    assert tables[0]["run_id"].iloc[0] != tables[1]["run_id"].iloc[0]
