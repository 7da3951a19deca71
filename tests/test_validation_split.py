"""The validation split (``scenario.val_fraction``): which images are held out, that learners never
train on them, the ``acc_val`` / ``acc_val_avg`` columns, and ``pilot.tables --select-by`` choosing a
sweep point by its validation score while reporting its test numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import FAST, compose_config, run_config

from pilot import tables
from pilot.data.datasets import synthetic
from pilot.data.images import ArrayImages, ClassificationData
from pilot.data.pipeline import TEST, TRAIN, VAL, DataPipeline, holdout_mask
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms
from pilot.errors import ConfigError, DatasetError
from pilot.loop import RunInterrupted
from pilot.runtime import make_runtime
from pilot.sinks.csv import SESSION_COLUMNS
from pilot.tables.results import select_by

TIMING = ["train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "finished_at"]


def pipeline_for(data: ClassificationData, val_fraction: float, seed: int = 1993, **scenario) -> DataPipeline:
    scenario = make_scenario(data.num_classes, 2, 2, val_fraction=val_fraction, **scenario)
    runtime = make_runtime(device="cpu", progress=False)
    return DataPipeline(data, scenario, ImageTransforms(size=32), runtime, seed=seed)


# ---------------------------------------------------------------------------------------------
# Which images are held out


def test_holdout_takes_the_fraction_of_every_class_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 3, 7])
    mask = holdout_mask(labels, 0.2, seed=1)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [2, 4, 1, 1]  # round(0.2 n), at least one
    assert np.array_equal(mask, holdout_mask(labels, 0.2, seed=1))  # seeded: the same every time
    assert not np.array_equal(mask, holdout_mask(labels, 0.2, seed=2))
    # A class's draw does not depend on the other classes: drop class 1, class 0 keeps its images.
    without_1 = labels[labels != 1]
    assert np.array_equal(holdout_mask(without_1, 0.2, seed=1)[without_1 == 0], mask[labels == 0])
    # Never the whole class; nothing at 0.
    assert holdout_mask(np.array([0, 0]), 0.9, seed=1).sum() == 1
    assert not holdout_mask(labels, 0.0, seed=1).any()
    with pytest.raises(DatasetError, match="class 5 has 1 training image"):
        holdout_mask(np.array([5, 6, 6]), 0.5, seed=1)


def test_pipeline_keeps_validation_images_out_of_training_and_prototypes():
    data = synthetic(num_classes=6, train_per_class=10, test_per_class=4, image_size=32)
    pipeline = pipeline_for(data, 0.3)
    assert pipeline.has_validation
    everything = range(0, 6)
    train, val = set(pipeline.indices(TRAIN, everything)), set(pipeline.indices(VAL, everything))
    assert len(val) == 6 * 3 and not train & val and train | val == set(range(60))
    held_out = np.flatnonzero(holdout_mask(data.train.labels, 0.3, 1993))
    assert val == set(held_out.tolist())
    seen_by_learner = set()
    for info in pipeline.scenario.sessions:
        session = pipeline.session(info)
        for stream in (session.train_batches(4), session.prototype_batches(4)):
            for batch in stream:
                assert batch.split == TRAIN
                seen_by_learner |= set(batch.ids.tolist())
    assert seen_by_learner == train
    # Validation batches: the held-out images, test transform, labels remapped like the training ones.
    batches = list(pipeline.eval_batches(VAL, everything, 5))
    ids = torch.cat([b.ids for b in batches])
    assert set(ids.tolist()) == val and all(b.split == VAL and not b.augmented for b in batches)
    labels = torch.cat([b.labels for b in batches])
    assert torch.equal(labels, torch.as_tensor(pipeline.labels(TRAIN))[ids])
    assert labels.tolist() == sorted(labels.tolist())  # class-sorted, as test batches
    assert torch.equal(batches[0].images, ImageTransforms(size=32).test_batch(data.train.images[batches[0].ids]))


def test_no_validation_leaves_the_training_data_as_it_was():
    data = synthetic(num_classes=4, train_per_class=8, test_per_class=2, image_size=32)
    pipeline = pipeline_for(data, 0.0)
    assert not pipeline.has_validation and len(pipeline.indices(VAL, range(0, 4))) == 0
    labels = pipeline.labels(TRAIN)
    assert pipeline.indices(TRAIN, range(0, 4)).tolist() == np.argsort(labels, kind="stable").tolist()
    assert pipeline.indices(TEST, range(0, 2)).tolist() == np.flatnonzero(pipeline.labels(TEST) < 2).tolist()


def test_validation_images_do_not_depend_on_the_class_order():
    data = synthetic(num_classes=6, train_per_class=10, test_per_class=2, image_size=32)
    shuffled = pipeline_for(data, 0.25, class_order="shuffle")
    natural = pipeline_for(data, 0.25, class_order="natural")
    assert set(shuffled.indices(VAL, range(0, 6))) == set(natural.indices(VAL, range(0, 6)))
    assert set(pipeline_for(data, 0.25, seed=7).indices(VAL, range(0, 6))) != set(shuffled.indices(VAL, range(0, 6)))


def test_val_fraction_must_be_below_one(tmp_path):
    from pilot.config import validate_config

    for bad in ("1.0", "-0.1", "true"):
        cfg = compose_config(FAST + ["+method=simplecil", f"scenario.val_fraction={bad}"], tmp_path)
        with pytest.raises(ConfigError, match="scenario.val_fraction"):
            validate_config(cfg)
    validate_config(compose_config(FAST + ["+method=simplecil", "scenario.val_fraction=0"], tmp_path))


def test_a_class_of_one_training_image_cannot_give_a_validation_image():
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    data = ClassificationData(
        "tiny", ["a", "b"], ArrayImages(images, np.array([0, 1, 1])), ArrayImages(images, np.array([0, 1, 1]))
    )
    with pytest.raises(DatasetError, match="val_fraction"):
        pipeline_for(data, 0.5)


# ---------------------------------------------------------------------------------------------
# The columns a run writes


def test_run_writes_validation_accuracy(tmp_path):
    sessions = {}
    for fraction in ("0.25", "0"):
        run_dir = tmp_path / f"val{fraction}"
        run_config(FAST + ["+method=simplecil", "dataset.noise=250", f"scenario.val_fraction={fraction}"], run_dir)
        sessions[fraction] = pd.read_csv(run_dir / "sessions.csv")
        assert list(sessions[fraction].columns) == SESSION_COLUMNS
    with_val, without = sessions["0.25"], sessions["0"]
    assert with_val["acc_val"].between(0, 100).all() and with_val["acc_val"].nunique() > 1
    running = with_val["acc_val"].expanding().mean()
    np.testing.assert_allclose(with_val["acc_val_avg"], running, atol=1e-3)
    assert without["acc_val"].isna().all() and without["acc_val_avg"].isna().all()
    # Holding out 4 of 16 training images per class changes SimpleCIL's prototypes, not the test set.
    assert with_val["n_test"].tolist() == without["n_test"].tolist()
    assert with_val["run_id"].iloc[0] != without["run_id"].iloc[0]


def test_val_fraction_zero_keeps_older_run_ids(tmp_path):
    """The new keys at their default stay out of the hashes: runs recorded before they existed keep their
    run_id and group_id (resume, tables)."""
    from pilot.provenance import config_hash

    plain = compose_config(FAST + ["+method=simplecil"], tmp_path)
    older = compose_config(FAST + ["+method=simplecil", "~scenario.val_fraction", "~scenario.shuffle_test"], tmp_path)
    assert config_hash(plain) == config_hash(older)
    assert config_hash(plain, ignore_seed=True) == config_hash(older, ignore_seed=True)
    held_out = compose_config(FAST + ["+method=simplecil", "scenario.val_fraction=0.1"], tmp_path)
    assert config_hash(held_out) != config_hash(plain)


def test_interrupted_run_with_validation_resumes_to_the_same_csv(tmp_path):
    overrides = FAST + ["+method=simplecil", "dataset.noise=250", "scenario.val_fraction=0.25"]
    run_config(overrides, tmp_path / "full")
    with pytest.raises(RunInterrupted):
        run_config(overrides + ["debug.stop_after_session=1"], tmp_path / "cut")
    run_config(overrides + ["resume=true"], tmp_path / "cut")
    full = pd.read_csv(tmp_path / "full" / "sessions.csv").drop(columns=TIMING)
    resumed = pd.read_csv(tmp_path / "cut" / "sessions.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(resumed, full)
    assert full["acc_val_avg"].notna().all()


# ---------------------------------------------------------------------------------------------
# --select-by on hand-written runs


def write_point(
    root: Path, method: str, lr: float, seed: int, acc: float, acc_val: float | None, precision: str = "fp32"
) -> Path:
    """A finished two-session run of ``method`` with ``method.lr=lr``: last-session test top-1 ``acc``
    and validation top-1 ``acc_val`` (None: no validation set)."""
    group = f"{method}-{lr}-{precision}"
    run_dir = root / f"{group}-s{seed}"
    run = {
        "run_id": f"{group}-s{seed}",
        "group_id": group,
        "method": method,
        "dataset": "cifar100",
        "backbone": "vit_b16_in1k",
        "scenario": "B0Inc50",
        "seed": seed,
        "num_sessions": 2,
    }
    val = [math.nan, math.nan] if acc_val is None else [acc_val + 10, acc_val]
    rows = [
        {**run, "session": k, "n_seen": 50 * (k + 1), "acc": a, "acc_avg": np.mean([90, acc][: k + 1])}
        | {"acc_val": v, "acc_val_avg": np.nanmean(val[: k + 1]) if acc_val is not None else math.nan}
        for k, (a, v) in enumerate(zip([90, acc], val))
    ]
    run_dir.mkdir(parents=True)
    pd.DataFrame(rows).reindex(columns=SESSION_COLUMNS).to_csv(run_dir / "sessions.csv", index=False)
    config = {
        "seed": seed,
        "labels": {"method": method, "dataset": "cifar100", "backbone": "vit_b16_in1k"},
        "method": {"_target_": f"pilot.learners.{method}.X", "lr": lr},
        "runtime": {"precision": precision},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_select_by_keeps_the_best_validation_point_per_pool(tmp_path):
    root = tmp_path / "results"
    # l2p: lr 0.1 has the better validation score (mean 61 vs 60) but the worse test score.
    write_point(root, "l2p", 0.01, 1, acc=80, acc_val=58)
    write_point(root, "l2p", 0.01, 2, acc=82, acc_val=62)
    write_point(root, "l2p", 0.1, 1, acc=70, acc_val=61)
    write_point(root, "l2p", 0.1, 2, acc=72, acc_val=61)
    # The same sweep in bf16 is another pool: chosen among separately (lr 0.01 wins there).
    write_point(root, "l2p", 0.01, 1, acc=81, acc_val=65, precision="bf16")
    write_point(root, "l2p", 0.1, 1, acc=71, acc_val=64, precision="bf16")
    # ease: no validation scores at all: left out with a note. simplecil: one point, kept.
    write_point(root, "ease", 0.01, 1, acc=75, acc_val=None)
    write_point(root, "ease", 0.1, 1, acc=76, acc_val=None)
    write_point(root, "simplecil", 0.0, 1, acc=77, acc_val=None)

    results = tables.load_results([root])
    runs, selections, notes = select_by(results.runs, "acc_val")
    kept = runs.groupby(["method", "variant"])["run_dir"].apply(lambda d: sorted(Path(p).name for p in d)).to_dict()
    assert kept == {
        ("l2p", "method.lr=0.1, runtime.precision=fp32"): ["l2p-0.1-fp32-s1", "l2p-0.1-fp32-s2"],
        ("l2p", "method.lr=0.01, runtime.precision=bf16"): ["l2p-0.01-bf16-s1"],
        ("simplecil", ""): ["simplecil-0.0-fp32-s1"],
    }
    fp32 = next(s for s in selections if s.group_id == "l2p-0.1-fp32")
    assert fp32.points == (
        ("method.lr=0.01, runtime.precision=fp32", 60.0, 2),
        ("method.lr=0.1, runtime.precision=fp32", 61.0, 2),
    )
    assert "method.lr=0.1, runtime.precision=fp32 (61.00, 2 seeds) over method.lr=0.01" in fp32.describe()
    assert len(notes) == 1 and notes[0].startswith("ease · cifar100") and "scenario.val_fraction" in notes[0]
    # acc_val_avg (mean over sessions, here acc_val + 5) chooses the same way.
    assert {s.group_id for s in select_by(results.runs, "acc_val_avg")[1]} == {"l2p-0.1-fp32", "l2p-0.01-bf16"}
    with pytest.raises(tables.TablesError, match="--select-by"):
        select_by(results.runs, "acc")

    code = tables.main([str(root), "--out", str(tmp_path / "out"), "--select-by", "acc_val", "--metrics", "acc_last"])
    assert code == 0
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    row = table[(table["method"] == "l2p") & (table["variant"].str.contains("fp32"))]
    assert row[["mean", "n", "selected_by"]].values.tolist() == [[71.0, 2, "acc_val"]]  # its *test* numbers
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "Selected by acc_val" in markdown and "over method.lr=0.01, runtime.precision=fp32 (60.00" in markdown
    assert "ease" not in table["method"].tolist()


# ---------------------------------------------------------------------------------------------
# A real sweep through the command line


def test_multirun_sweep_selected_by_validation(tmp_path):
    """``pilot.train -m`` over two learning rates with a validation set, then ``pilot.tables
    --select-by acc_val``: the table shows the lr whose validation score is better, with its test acc.

    EASE, because it trains with a learning rate and still learns on the tiny random ViT (prompt
    learners and SLCA predict one class there whatever the lr). Noisy synthetic images with 40 training
    images per class (10 held out) keep the accuracies apart."""
    results = tmp_path / "results"
    sweep = results / "multirun" / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pilot.train", "-m", "+method=ease", *FAST]
        + ["method.epochs=2", "method.optimizer.lr=0.001,1.0", "dataset.noise=250", "dataset.train_per_class=40"]
        + ["scenario.val_fraction=0.25", f"paths.results_dir={results}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = {}
    for path in sorted(sweep.glob("*/sessions.csv")):
        rows = pd.read_csv(path)
        lr = yaml.safe_load((path.parent / "config.yaml").read_text())["method"]["optimizer"]["lr"]
        last[lr] = rows.iloc[-1]
    assert sorted(last) == [0.001, 1.0] and last[0.001]["acc_val"] != last[1.0]["acc_val"]
    best = max(last, key=lambda lr: last[lr]["acc_val"])

    out = tmp_path / "tables"
    shown = subprocess.run(
        [sys.executable, "-m", "pilot.tables", str(results), "--out", str(out), "--select-by", "acc_val"]
        + ["--metrics", "acc_last,acc_val"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if line.startswith("| ease")]
    assert len(rows) == 1, shown.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == f"ease [method.optimizer.lr={best}]"
    assert cells[1:3] == [f"{last[best]['acc']:.2f}", f"{last[best]['acc_val']:.2f}"]
    other = 1.0 if best == 0.001 else 0.001
    assert f"method.optimizer.lr={other} ({last[other]['acc_val']:.2f}, 1 seed)" in shown.stdout
    assert "Selected by acc_val" in shown.stdout
