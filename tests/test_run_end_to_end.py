"""The run loop end to end through Hydra compose: files, columns, values, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import compose_config, run_config

from pilot.eval import metrics
from pilot.loop import RunInterrupted
from pilot.sinks.csv import SESSION_COLUMNS

TIMING = ["train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "finished_at"]


def test_simplecil_run_writes_every_file(tmp_path, fast):
    run_dir = tmp_path / "run"
    table = run_config(fast + ["+method=simplecil", "scenario=b0inc2"], run_dir)

    sessions = pd.read_csv(run_dir / "sessions.csv")
    assert list(sessions.columns) == SESSION_COLUMNS
    assert sessions["session"].tolist() == [0, 1, 2, 3, 4]
    assert sessions["n_seen"].tolist() == [2, 4, 6, 8, 10]
    assert (sessions["method"] == "simplecil").all() and (sessions["scenario"] == "B0Inc2").all()
    assert sessions["n_test"].tolist() == [16, 32, 48, 64, 80]  # 8 test images per class
    np.testing.assert_allclose(sessions["acc"], table["acc"], atol=1e-4)
    # The CSV metrics are the ones derived from matrix.csv.
    matrix = pd.read_csv(run_dir / "matrix.csv")
    R = np.full((5, 5), np.nan)
    R[matrix["session"], matrix["block"]] = matrix["acc"]
    n = matrix.groupby("block")["n_test"].first().to_numpy()
    np.testing.assert_allclose(sessions["acc"], metrics.accuracy(R, n), atol=1e-3)
    np.testing.assert_allclose(
        sessions["acc_avg"], metrics.average_incremental_accuracy(metrics.accuracy(R, n)), atol=1e-3
    )
    np.testing.assert_allclose(sessions["forgetting"][1:], metrics.forgetting(R)[1:], atol=1e-3)
    assert sessions["forgetting"].isna().tolist() == [True, False, False, False, False]
    # Nothing is trained; the classifier holds 48-d prototypes of the classes seen.
    assert sessions["params_trainable"].tolist() == [0] * 5
    # The run directory describes itself.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["scenario"]["init_cls"] == 2 and config["seed"] == 1993
    order = json.loads((run_dir / "class_order.json").read_text())
    assert [o["original_class"] for o in order] == [int(c) for c in np.random.RandomState(1993).permutation(10)]
    split = json.loads((run_dir / "sessions.json").read_text())
    assert [s["size"] for s in split["sessions"]] == [2, 2, 2, 2, 2]
    # Random tiny ViT on separable synthetic classes: well above the 10% chance level.
    assert sessions["acc"].iloc[-1] > 40


def test_interrupted_run_resumes_to_the_same_csv(tmp_path, fast):
    overrides = fast + ["+method=simplecil", "scenario=b0inc2"]
    full = tmp_path / "full"
    run_config(overrides, full)

    cut = tmp_path / "cut"
    with pytest.raises(RunInterrupted):
        run_config(overrides + ["debug.stop_after_session=2"], cut)
    assert pd.read_csv(cut / "sessions.csv")["session"].tolist() == [0, 1, 2]
    run_config(overrides + ["resume=true"], cut)

    expected = pd.read_csv(full / "sessions.csv").drop(columns=TIMING)
    resumed = pd.read_csv(cut / "sessions.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(resumed, expected)
    pd.testing.assert_frame_equal(pd.read_csv(cut / "matrix.csv"), pd.read_csv(full / "matrix.csv"))


def test_rerun_into_a_finished_directory_needs_resume(tmp_path, fast):
    from pilot.errors import ConfigError

    overrides = fast + ["+method=simplecil", "scenario=b0inc5"]
    run_config(overrides, tmp_path / "r")
    with pytest.raises(ConfigError, match="resume=true"):
        run_config(overrides, tmp_path / "r")


def test_resume_with_a_different_config_is_refused(tmp_path, fast):
    from pilot.errors import ResumeError

    run_dir = tmp_path / "r"
    with pytest.raises(RunInterrupted):
        run_config(fast + ["+method=simplecil", "scenario=b0inc2", "debug.stop_after_session=0"], run_dir)
    with pytest.raises(ResumeError, match="another configuration"):
        run_config(fast + ["+method=simplecil", "scenario=b0inc2", "seed=7", "resume=true"], run_dir)


def test_seeds_share_a_group_but_not_a_run_id(tmp_path, fast):
    from pilot.provenance import config_hash

    a = compose_config(fast + ["+method=simplecil", "seed=1"], tmp_path)
    b = compose_config(fast + ["+method=simplecil", "seed=2"], tmp_path)
    c = compose_config(fast + ["+method=simplecil", "seed=1", "scenario=b0inc5"], tmp_path)
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, ignore_seed=True) == config_hash(b, ignore_seed=True)
    assert config_hash(a, ignore_seed=True) != config_hash(c, ignore_seed=True)
    # Where results are written does not change what is computed.
    d = compose_config(fast + ["+method=simplecil", "seed=1", "runtime.progress=true"], tmp_path / "elsewhere")
    assert config_hash(a) == config_hash(d)
