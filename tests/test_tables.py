"""pilot.tables: result CSVs -> tables (Markdown, LaTeX, CSV), comparison with published numbers,
plots; the presets of configs/experiment; results/published.csv.

Exact numbers come from hand-written run directories (values chosen so that means and stds are
easy to compute by hand); real ``simplecil`` runs in a multirun layout check grouping by seed,
incomplete runs and the config-difference labels end to end.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import compose_config, run_config
from PIL import Image

from pilot import tables
from pilot.config import CONFIG_DIR
from pilot.loop import RunInterrupted
from pilot.sinks.csv import MATRIX_COLUMNS, SESSION_COLUMNS

REPO = Path(__file__).resolve().parent.parent
SQRT7, SQRT8, SQRT13 = math.sqrt(7), math.sqrt(8), math.sqrt(13)


# ---------------------------------------------------------------------------------------------
# Hand-written runs


def write_run(
    run_dir: Path,
    *,
    method: str,
    seed: int,
    acc: list[float],
    dataset: str = "cifar100",
    backbone: str = "vit_b16_in1k",
    scenario: str = "B0Inc10",
    num_sessions: int | None = None,
    forgetting: float = float("nan"),
    elapsed_s: float = 60.0,
    method_cfg: dict | None = None,
    finished_at: str = "2026-01-01T00:00:00+00:00",
    matrix: np.ndarray | None = None,
) -> Path:
    """A run directory as the run loop writes it: sessions.csv (acc_avg = running mean of ``acc``;
    ``forgetting``/``elapsed_s`` on the last row), config.yaml, sessions.json and optionally matrix.csv."""
    method_cfg = method_cfg or {"_target_": f"pilot.learners.{method}.X", "init_lr": 0.01}
    group_id = f"{method}-{dataset}-{backbone}-{scenario}-" + "-".join(f"{k}{v}" for k, v in method_cfg.items())
    total = num_sessions or len(acc)
    run = {
        "run_id": f"{group_id}-s{seed}",
        "group_id": group_id,
        "method": method,
        "dataset": dataset,
        "backbone": backbone,
        "scenario": scenario,
        "seed": seed,
        "num_sessions": total,
    }
    inc = int(scenario.split("Inc")[1])
    rows = []
    for k, a in enumerate(acc):
        last = k == len(acc) - 1
        rows.append(
            {
                **run,
                "session": k,
                "n_seen": inc * (k + 1),
                "n_new": inc,
                "acc": a,
                "acc_avg": float(np.mean(acc[: k + 1])),
                "forgetting": forgetting if last and k else float("nan"),
                "elapsed_s": elapsed_s * (k + 1) / len(acc),
                "peak_mem_mb": 1024.0 * (k + 1),
                "params_trainable": 1_500_000,
                "finished_at": finished_at,
            }
        )
    run_dir.mkdir(parents=True)
    pd.DataFrame(rows).reindex(columns=SESSION_COLUMNS).to_csv(run_dir / "sessions.csv", index=False)
    config = {
        "seed": seed,
        "labels": {"method": method, "dataset": dataset, "backbone": backbone},
        "scenario": {"init_cls": inc, "increment": inc, "class_order": "shuffle", "order_seed": seed},
        "paths": {"results_dir": str(run_dir.parent)},
        "method": method_cfg,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "sessions.json").write_text(pd.Series(run).to_json())
    if matrix is not None:
        cells = [
            {**run, "session": k, "block": j, "acc": matrix[k, j], "n_test": 100}
            for k in range(len(matrix))
            for j in range(k + 1)
        ]
        pd.DataFrame(cells).reindex(columns=MATRIX_COLUMNS).to_csv(run_dir / "matrix.csv", index=False)
    return run_dir


@pytest.fixture
def hand_results(tmp_path) -> Path:
    """Two settings. cifar100/B0Inc10 (3 sessions): simplecil seeds 1-3 (Ā 85, 86, 90; A_last 80,
    82, 87; F 5, 6, 10; 1, 2, 3 min), l2p seed 1 (Ā 88, A_last 79, F 12, 10 min), ease swept over two
    init_lr values; imagenet_r/B0Inc20 (2 sessions): simplecil seeds 1, 2 (Ā 70, 66; A_last 64, 60).
    Plus an incomplete run and an older duplicate of simplecil seed 1, neither to be averaged."""
    root = tmp_path / "results"
    sweep = root / "multirun" / "2026-01-01_00-00-00"
    write_run(
        sweep / "0_simplecil_cifar100_s1",
        method="simplecil",
        seed=1,
        acc=[90, 85, 80],
        forgetting=5,
        elapsed_s=60,
        matrix=np.array([[90, np.nan, np.nan], [80, 90, np.nan], [70, 84, 87]]),
    )
    write_run(
        sweep / "1_simplecil_cifar100_s2", method="simplecil", seed=2, acc=[92, 84, 82], forgetting=6, elapsed_s=120
    )
    write_run(
        sweep / "2_simplecil_cifar100_s3", method="simplecil", seed=3, acc=[94, 89, 87], forgetting=10, elapsed_s=180
    )
    write_run(sweep / "3_l2p_cifar100_s1", method="l2p", seed=1, acc=[95, 90, 79], forgetting=12, elapsed_s=600)
    write_run(
        sweep / "4_ease_cifar100_s1",
        method="ease",
        seed=1,
        acc=[80, 75, 70],
        method_cfg={"_target_": "pilot.learners.ease.EASE", "init_lr": 0.01},
    )
    write_run(
        sweep / "5_ease_cifar100_s1",
        method="ease",
        seed=1,
        acc=[85, 80, 75],
        method_cfg={"_target_": "pilot.learners.ease.EASE", "init_lr": 0.1},
    )
    runs = root / "runs"
    write_run(
        runs / "2026-01-02_simplecil_imagenet_r_s1",
        method="simplecil",
        seed=1,
        acc=[76, 64],
        dataset="imagenet_r",
        scenario="B0Inc20",
    )
    write_run(
        runs / "2026-01-02_simplecil_imagenet_r_s2",
        method="simplecil",
        seed=2,
        acc=[72, 60],
        dataset="imagenet_r",
        scenario="B0Inc20",
    )
    write_run(runs / "2026-01-03_simplecil_cifar100_s4", method="simplecil", seed=4, acc=[10, 10], num_sessions=3)
    write_run(
        runs / "2025-12-31_simplecil_cifar100_s1",
        method="simplecil",
        seed=1,
        acc=[0, 0, 0],
        finished_at="2025-12-31T00:00:00+00:00",
    )  # an older copy of the same run_id: superseded
    return root


def cell(table: pd.DataFrame, method: str, metric: str, dataset: str = "cifar100", variant: str = "") -> pd.Series:
    rows = table[
        (table["method"] == method)
        & (table["metric"] == metric)
        & (table["dataset"] == dataset)
        & (table["variant"].astype(object).fillna("") == variant)
    ]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_cells_are_mean_and_sample_std_over_seeds(hand_results):
    results = tables.load_results([hand_results])
    cells = tables.summarize(results.runs, ["acc_avg", "acc_last", "forgetting", "time", "memory", "params"])
    s = lambda metric, dataset="cifar100": cell(cells, "simplecil", metric, dataset)  # noqa: E731
    assert (s("acc_avg")["mean"], s("acc_avg")["std"], s("acc_avg")["n"]) == pytest.approx((87.0, SQRT7, 3))
    assert (s("acc_last")["mean"], s("acc_last")["std"]) == pytest.approx((83.0, SQRT13))
    assert (s("forgetting")["mean"], s("forgetting")["std"]) == pytest.approx((7.0, SQRT7))
    assert (s("time")["mean"], s("time")["std"], s("time")["unit"]) == (pytest.approx(2.0), pytest.approx(1.0), "min")
    assert s("memory")["mean"] == pytest.approx(3.0)  # peak over sessions, 3 x 1024 MB
    assert s("params")["mean"] == pytest.approx(1.5)
    assert s("acc_last")["seeds"] == "1;2;3"  # the superseded copy of seed 1 (acc 0) is not averaged
    assert (s("acc_avg", "imagenet_r")["mean"], s("acc_avg", "imagenet_r")["std"]) == pytest.approx((68.0, SQRT8))
    assert (s("acc_last", "imagenet_r")["mean"], s("acc_last", "imagenet_r")["std"]) == pytest.approx((62.0, SQRT8))
    one = cell(cells, "l2p", "acc_avg")
    assert one["mean"] == pytest.approx(88.0) and one["n"] == 1 and math.isnan(one["std"])
    # The sweep is two rows labelled with the config value that differs, never one merged cell.
    assert cell(cells, "ease", "acc_last", variant="method.init_lr=0.01")["mean"] == pytest.approx(70.0)
    assert cell(cells, "ease", "acc_last", variant="method.init_lr=0.1")["mean"] == pytest.approx(75.0)
    # Incomplete and superseded runs are listed with their directory and sessions done/total.
    apart = results.incomplete.set_index(results.incomplete["run_dir"].map(lambda p: Path(p).name))
    assert apart.loc["2026-01-03_simplecil_cifar100_s4", ["sessions_done", "num_sessions", "reason"]].tolist() == [
        2,
        3,
        "incomplete",
    ]
    assert apart.loc["2025-12-31_simplecil_cifar100_s1", "reason"].startswith("superseded")
    assert len(apart) == 2


def test_markdown_latex_and_csv_outputs(hand_results, tmp_path, capsys):
    out = tmp_path / "out"
    code = tables.main(
        [str(hand_results), "--out", str(out), "--metrics", "acc_avg,acc_last", "--methods", "l2p,simplecil,ease"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method",
        "cifar100 B0Inc10: Ā",
        "cifar100 B0Inc10: A_last",
        "cifar100 B0Inc10: n",
        "imagenet_r B0Inc20: Ā",
        "imagenet_r B0Inc20: A_last",
        "imagenet_r B0Inc20: n",
    ]
    body = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| :")
    ]
    assert body == [
        ["l2p", "**88.00**", "79.00", "1", "—", "—", "—"],
        ["simplecil", "87.00 ± 2.65", "**83.00** ± 3.61", "3", "68.00 ± 2.83", "62.00 ± 2.83", "2"],
        ["ease [method.init_lr=0.01]", "75.00", "70.00", "1", "—", "—", "—"],
        ["ease [method.init_lr=0.1]", "80.00", "75.00", "1", "—", "—", "—"],
    ]
    assert "Setting: backbone vit_b16_in1k" in printed
    assert "2026-01-03_simplecil_cifar100_s4" in printed and "sessions 2/3  (incomplete)" in printed
    assert (out / "table.md").read_text() == printed

    tex = (out / "table.tex").read_text()
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\begin{tabular}{@{}l rrr rrr@{}}" in tex
    assert r"\multicolumn{3}{c}{CIFAR-100 B0Inc10} & \multicolumn{3}{c}{ImageNet-R B0Inc20} \\" in tex
    assert r"\cmidrule(lr){2-4}\cmidrule(lr){5-7}" in tex
    assert r"Method & $\bar{A}$ & $A_\mathrm{last}$ & $n$ & $\bar{A}$ & $A_\mathrm{last}$ & $n$ \\" in tex
    assert r"L2P & \textbf{88.00} & 79.00 & 1 & -- & -- & -- \\" in tex
    assert (
        r"SimpleCIL & 87.00\,{\scriptsize$\pm$2.65} & \textbf{83.00}\,{\scriptsize$\pm$3.61} & 3 & "
        r"68.00\,{\scriptsize$\pm$2.83} & 62.00\,{\scriptsize$\pm$2.83} & 2 \\"
    ) in tex  # one row: no bold
    assert r"EASE {\scriptsize[method.init\_lr=0.01]} & 75.00 & 70.00 & 1" in tex
    assert "ViT-B/16-IN1K." in tex  # the constant backbone goes in the caption

    csv = pd.read_csv(out / "table.csv")
    assert len(csv) == 2 * (4 + 1)  # 2 metrics x (l2p, simplecil, 2 x ease on cifar100 + simplecil on imagenet_r)
    row = cell(csv, "simplecil", "acc_last")
    assert (row["mean"], row["std"], row["n"], row["seeds"], row["unit"]) == (
        pytest.approx(83.0),
        pytest.approx(SQRT13, abs=1e-9),
        3,
        "1;2;3",
        "%",
    )
    assert math.isnan(cell(csv, "l2p", "acc_last")["std"])
    assert csv["method"].drop_duplicates().tolist() == ["l2p", "simplecil", "ease"]  # --methods order
    incomplete = pd.read_csv(out / "incomplete.csv")
    assert sorted(incomplete["sessions_done"]) == [2, 3]


def test_filters_select_settings_and_metrics(hand_results, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        tables.main(
            [str(hand_results), "--out", str(out), "--datasets", "imagenet_r", "--metrics", "acc_last,forgetting,time"]
        )
        == 0
    )
    csv = pd.read_csv(out / "table.csv")
    assert set(csv["dataset"]) == {"imagenet_r"} and set(csv["method"]) == {"simplecil"}
    # forgetting of a 2-session run is defined (last row) only where written; here it is NaN -> no cell
    assert csv["metric"].tolist() == ["acc_last", "time"]
    assert capsys.readouterr().out.count("| simplecil") == 1
    assert tables.main([str(hand_results), "--metrics", "acc_first"]) == 2  # unknown metric
    assert tables.main([str(tmp_path / "nothing")]) == 2  # no such directory
    (tmp_path / "empty").mkdir()
    assert tables.main([str(tmp_path / "empty")]) == 2  # no sessions.csv under it
    assert "no sessions.csv found" in capsys.readouterr().err
    # Only an unfinished run: nothing is averaged, the run is listed, exit status 1.
    write_run(tmp_path / "partial" / "run", method="simplecil", seed=1, acc=[50.0], num_sessions=3)
    assert tables.main([str(tmp_path / "partial")]) == 1
    assert "sessions 1/3  (incomplete)" in capsys.readouterr().out


def test_compare_adds_published_value_and_difference(hand_results, tmp_path, capsys):
    published = tmp_path / "published.csv"
    pd.DataFrame(
        [
            ["simplecil", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_last", 82.3, "plot", "digitised", None],
            ["simplecil", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_last", 81.0, "other paper", "", None],
            ["simplecil", "cifar100", "vit_b16_in1k", "B0Inc10", "acc", 95.0, "plot", "curve point", 0],
            ["simplecil", "imagenet_r", "vit_b16_in1k", "B0Inc20", "acc_avg", 67.1, "plot", "", None],
            ["l2p", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_avg", 84.4, "paper", "", None],
            ["l2p", "cifar100", "vit_b16_in21k", "B0Inc10", "acc_last", 83.83, "paper", "", None],
        ],
        columns=["method", "dataset", "backbone", "scenario", "metric", "value", "source", "note", "session"],
    ).to_csv(published, index=False)
    out = tmp_path / "out"
    assert (
        tables.main(
            [str(hand_results), "--out", str(out), "--methods", "simplecil,l2p", "--compare", str(published), "--plots"]
        )
        == 0
    )
    csv = pd.read_csv(out / "table.csv")
    s = cell(csv, "simplecil", "acc_last")
    assert (s["published"], s["diff"], s["published_source"]) == (82.3, pytest.approx(83.0 - 82.3), "plot")
    assert s["published_others"] == "81 (other paper)"
    assert cell(csv, "simplecil", "acc_avg", "imagenet_r")["diff"] == pytest.approx(68.0 - 67.1)
    assert cell(csv, "l2p", "acc_avg")["diff"] == pytest.approx(88.0 - 84.4)
    assert math.isnan(cell(csv, "l2p", "acc_last")["published"])  # published for IN21K only: no match
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| method"))
    assert "cifar100 B0Inc10: A_last pub." in header and "imagenet_r B0Inc20: Ā pub." in header
    simplecil = next(line for line in printed.splitlines() if line.startswith("| simplecil"))
    assert [c.strip() for c in simplecil.strip("|").split("|")][1:7] == [
        "87.00 ± 2.65",
        "—",
        "—",
        "**83.00** ± 3.61",
        "82.30",
        "+0.70",
    ]  # Ā pub./Δ: l2p has one, not us
    assert "No published counterpart (3 cell(s)):" in printed
    assert "  simplecil · cifar100 · vit_b16_in1k · B0Inc10: acc_avg" in printed
    assert "  l2p · cifar100 · vit_b16_in1k · B0Inc10: acc_last" in printed
    assert "  simplecil · imagenet_r · vit_b16_in1k · B0Inc20: acc_last" in printed
    assert r"pub. & $\Delta$" in (out / "table.tex").read_text()
    # The published per-session point is drawn beside our curve.
    svg = (out / "curves_cifar100_vit_b16_in1k_B0Inc10.svg").read_text()
    assert "published (dashed)" in svg and "stroke-dasharray" in svg
    assert "published (dashed)" not in (out / "curves_imagenet_r_vit_b16_in1k_B0Inc20.svg").read_text()


def test_curve_and_heatmap_plots(hand_results, tmp_path):
    out = tmp_path / "out"
    run = hand_results / "multirun" / "2026-01-01_00-00-00" / "0_simplecil_cifar100_s1"
    assert tables.main([str(hand_results), "--out", str(out), "--plots", "--heatmap", str(run)]) == 0
    curves = pd.read_csv(out / "curves.csv")
    last = curves[(curves["method"] == "simplecil") & (curves["dataset"] == "cifar100") & (curves["session"] == 2)]
    assert last[["n_seen", "mean", "min", "max", "n"]].values.tolist() == [[30, 83.0, 80.0, 87.0, 3]]
    assert last["std"].item() == pytest.approx(SQRT13)
    assert curves.drop_duplicates(["dataset", "method", "variant"])["method"].tolist() == [
        "simplecil",
        "l2p",
        "ease",
        "ease",
        "simplecil",
    ]  # the table's row order, per setting
    # 3.3 in wide at 300 dpi; 2.0 in for the axes + 0.2 in per legend row (title + entries; one
    # column when a label is longer than 22 characters, as "ease [method.init_lr=0.01]" is).
    sizes = {
        "curves_cifar100_vit_b16_in1k_B0Inc10": (990, 900),  # 2.0 + 0.2 x (1 + 4 entries) = 3.0 in
        "curves_imagenet_r_vit_b16_in1k_B0Inc20": (990, 720),
    }  # 2.0 + 0.2 x (1 + 1) = 2.4 in
    for name, size in sizes.items():
        with Image.open(out / f"{name}.png") as image:
            assert image.size == size
        svg = (out / f"{name}.svg").read_text()
        assert "SimpleCIL" in svg and "band: min–max over seeds" in svg and "classes seen" in svg
    assert "EASE [method.init_lr=0.1]" in (out / "curves_cifar100_vit_b16_in1k_B0Inc10.svg").read_text()
    with Image.open(out / "heatmap_0_simplecil_cifar100_s1.png") as image:
        assert image.size == (990, 900)
    svg = (out / "heatmap_0_simplecil_cifar100_s1.svg").read_text()
    for value in ("90.0", "80.0", "70.0", "84.0", "87.0"):
        assert f">{value}<" in svg
    assert "SimpleCIL · CIFAR-100 · B0Inc10 · seed 1" in svg
    np.testing.assert_array_equal(np.isnan(tables.read_matrix(run)), np.triu(np.ones((3, 3), bool), 1))


# ---------------------------------------------------------------------------------------------
# Real runs: a multirun sweep layout, a single-run layout, an interrupted run, a config variant

FAST_NOISY = ["+method=simplecil", "scenario=b0inc5", "dataset.noise=200"]  # 2 sessions; accuracies vary by seed


@pytest.fixture(scope="module")
def real_results(tmp_path_factory):
    from conftest import FAST

    root = tmp_path_factory.mktemp("real") / "results"
    sweep = root / "multirun" / "2026-01-01_00-00-00"
    run_config(FAST + FAST_NOISY + ["seed=1993"], sweep / "0_simplecil_synthetic_s1993")
    run_config(FAST + FAST_NOISY + ["seed=1993", "method.batch_size=8"], sweep / "1_simplecil_synthetic_s1993")
    with pytest.raises(RunInterrupted):
        run_config(
            FAST + FAST_NOISY + ["seed=1995", "debug.stop_after_session=0"], sweep / "2_simplecil_synthetic_s1995"
        )
    run_config(FAST + FAST_NOISY + ["seed=1994"], root / "runs" / "2026-01-02_00-00-00_simplecil_synthetic_s1994")
    return root


def test_real_runs_are_grouped_by_seed(real_results):
    results = tables.load_results([real_results])
    cells = tables.summarize(results.runs, ["acc_avg", "acc_last"])
    default = results.runs[results.runs["variant"] == "method.batch_size=128"]
    assert sorted(default["seed"]) == [1993, 1994] and default["group_id"].nunique() == 1
    assert default["run_id"].nunique() == 2
    last = [pd.read_csv(Path(d) / "sessions.csv").iloc[-1] for d in default["run_dir"]]
    for metric, column in (("acc_last", "acc"), ("acc_avg", "acc_avg")):
        values = np.array([row[column] for row in last])
        assert values.std() > 0  # the seeds really differ
        c = cell(cells, "simplecil", metric, "synthetic", "method.batch_size=128")
        assert (c["mean"], c["std"], c["n"]) == (pytest.approx(values.mean()), pytest.approx(values.std(ddof=1)), 2)
    # Only the batch size tells the two groups apart (the class-order seed follows the seed).
    assert set(results.runs["variant"]) == {"method.batch_size=128", "method.batch_size=8"}
    assert results.incomplete[["sessions_done", "num_sessions", "reason"]].values.tolist() == [[1, 2, "incomplete"]]
    assert results.incomplete["run_dir"].item().endswith("2_simplecil_synthetic_s1995")


def test_cli_end_to_end(real_results, tmp_path):
    out = tmp_path / "tables"
    # `--compare RESULTS_DIR`: the optional value is a directory, so it is a results dir and the
    # comparison uses results/published.csv.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilot.tables",
            "--out",
            str(out),
            "--plots",
            "--metrics",
            "acc_avg,acc_last,forgetting,time",
            "--compare",
            str(real_results),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    csv = pd.read_csv(out / "table.csv")
    row = cell(csv, "simplecil", "acc_last", "synthetic", "method.batch_size=128")
    assert row["n"] == 2 and row["seeds"] == "1993;1994"
    line = next(li for li in done.stdout.splitlines() if li.startswith("| simplecil [method.batch_size=128]"))
    assert f"{row['mean']:.2f} ± {row['std']:.2f}" in line and line.rstrip(" |").endswith("2")
    assert "2_simplecil_synthetic_s1995" in done.stdout and "sessions 1/2" in done.stdout
    # Nothing published for the synthetic setting: every Ā/A_last/F cell is listed as unmatched.
    assert "No published counterpart (6 cell(s)):" in done.stdout
    with Image.open(out / "curves_synthetic_vit_test_tiny_B0Inc5.png") as image:
        assert image.size == (990, 780)  # 2.0 in + 0.2 in x (title + 2 long labels in one column)
    assert (out / "table.md").read_text() == done.stdout


# ---------------------------------------------------------------------------------------------
# Presets and published numbers

PRESETS = {
    "cifar100_b0inc10_in1k": ("cifar100", 10, "vit_b16_in1k"),
    "cifar100_b0inc10_in21k": ("cifar100", 10, "vit_b16_in21k"),
    "cifar100_b0inc5_in21k": ("cifar100", 5, "vit_b16_in21k"),
    "cifar100_b0inc5_in1k": ("cifar100", 5, "vit_b16_in1k"),
    "imagenet_r_b0inc20_in1k": ("imagenet_r", 20, "vit_b16_in1k"),
    "imagenet_r_b0inc20_in21k": ("imagenet_r", 20, "vit_b16_in21k"),
    "imagenet_r_b0inc5_in21k": ("imagenet_r", 5, "vit_b16_in21k"),
    "fashion_mnist_demo": ("fashion_mnist", 2, "efficientnet_lite0"),
}
MODEL_NAMES = {
    "vit_b16_in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_b16_in21k": "vit_base_patch16_224.augreg_in21k",
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_pin_the_published_setting(preset):
    dataset, inc, backbone = PRESETS[preset]
    cfg = compose_config([f"experiment={preset}", "+method=simplecil"])
    assert (cfg.labels.dataset, cfg.scenario.init_cls, cfg.scenario.increment, cfg.labels.backbone) == (
        dataset,
        inc,
        inc,
        backbone,
    )
    if backbone in MODEL_NAMES:
        assert cfg.backbone.model_name == MODEL_NAMES[backbone]
    text = (CONFIG_DIR / "experiment" / f"{preset}.yaml").read_text()
    assert f"python -m pilot.train -m experiment={preset} +method=" in text  # the one-line command


def test_fashion_mnist_demo_uses_the_embedded_subset_at_112px():
    cfg = compose_config(["experiment=fashion_mnist_demo", "+method=simplecil"])
    assert (cfg.dataset.variant, cfg.backbone.input_size) == ("embedded", 112)


def test_published_csv_holds_section_9():
    published = tables.read_published(REPO / "results" / "published.csv")
    assert list(published.columns[:8]) == [
        "method",
        "dataset",
        "backbone",
        "scenario",
        "metric",
        "value",
        "source",
        "note",
    ]
    assert set(published["dataset"]) == {"cifar100", "imagenet_r"}
    assert set(published["backbone"]) == {"vit_b16_in1k", "vit_b16_in21k"}
    assert set(published["scenario"]) == {"B0Inc5", "B0Inc10", "B0Inc20"}
    assert set(published["metric"]) == {"acc_avg", "acc_last", "forgetting", "acc"}
    assert set(published["method"]) - {"foster"} <= set(tables.METHOD_ORDER)
    assert published["value"].between(0, 100).all()
    keys = ["method", "dataset", "backbone", "scenario", "metric", "session", "source"]
    assert not published.duplicated(keys).any()
    summary = published[published["session"].isna()]
    first = summary.drop_duplicates(["method", "dataset", "backbone", "scenario", "metric"]).set_index(
        ["method", "dataset", "backbone", "scenario", "metric"]
    )["value"]
    expected = {  # the value --compare uses for a few cells (docs/methods.md §9)
        ("simplecil", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_last"): 76.2,  # PILOT plot
        ("simplecil", "imagenet_r", "vit_b16_in1k", "B0Inc20", "acc_avg"): 67.1,
        ("dualprompt", "imagenet_r", "vit_b16_in1k", "B0Inc20", "acc_last"): 69.2,
        ("ease", "cifar100", "vit_b16_in21k", "B0Inc5", "acc_avg"): 91.51,  # EASE Table 1
        ("ease", "imagenet_r", "vit_b16_in21k", "B0Inc5", "acc_last"): 70.58,
        ("mos", "imagenet_r", "vit_b16_in21k", "B0Inc20", "acc_last"): 77.93,  # MOS table
        ("coda", "imagenet_r", "vit_b16_in21k", "B0Inc20", "acc_avg"): 77.97,
        ("slca", "cifar100", "vit_b16_in21k", "B0Inc5", "acc_last"): 88.55,
        ("aper_vpt_shallow", "imagenet_r", "vit_b16_in21k", "B0Inc5", "acc_avg"): 66.63,
        ("l2p", "cifar100", "vit_b16_in21k", "B0Inc10", "forgetting"): 7.63,  # L2P paper
        ("dualprompt", "imagenet_r", "vit_b16_in21k", "B0Inc20", "forgetting"): 4.68,
        ("ranpac", "imagenet_r", "vit_b16_in1k", "B0Inc20", "acc_last"): 77.9,
        ("mos", "cifar100", "vit_b16_in1k", "B0Inc5", "acc_last"): 89.12,  # MOS IN1K logs
    }
    assert {k: first[k] for k in expected} == pytest.approx(expected)
    # Values §9 marks n/a are absent; the EASE/MOS baseline table is complete (11 methods, SLCA
    # has no IN-R B0Inc5 entry); the APER logs and the digitised PILOT curves are there.
    assert ("l2p", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_avg") not in first.index
    assert ("aper_vpt_shallow", "cifar100", "vit_b16_in1k", "B0Inc10", "acc_avg") not in first.index
    baseline = summary[summary["note"].str.contains("APER data split")]
    assert len(baseline) == 2 * (11 * 3 - 1) + 4  # + the MOS rows themselves
    logs = summary[summary["source"].str.startswith("RevisitingCIL")]
    assert len(logs) == 6 * 2 * 2 and logs["value"].tolist()[:2] == [87.57, 81.28]
    curve = published[
        (published["method"] == "simplecil") & (published["dataset"] == "cifar100") & (published["metric"] == "acc")
    ].sort_values("session")
    assert curve["value"].tolist() == [92.6, 88.3, 86.3, 83.6, 81.9, 80.0, 80.0, 77.3, 76.6, 76.2]
    assert (
        published["note"].str.contains("unconfirmed")
        == (published["source"].str.contains("CODA-Prompt paper") | (published["value"] == 94.09))
    ).all()
