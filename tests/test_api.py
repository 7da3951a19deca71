"""The Python API: ``pilot.compose`` and ``pilot.run`` (pilot/api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST
from omegaconf import DictConfig

import pilot
from pilot.errors import ConfigError
from pilot.loop import run as run_loop

ROOT = Path(__file__).resolve().parent.parent
TWO_SESSIONS = ["+method=simplecil", "scenario=b0inc5"]  # 10 synthetic classes: two sessions of five
METRICS = ["session", "n_seen", "acc", "acc_top5", "acc_old", "acc_new", "acc_avg", "forgetting", "bwt", "n_test"]


def test_run_returns_the_per_session_table_of_sessions_csv(tmp_path):
    table = pilot.run(overrides=FAST + TWO_SESSIONS, run_dir=tmp_path / "run")
    assert isinstance(table, pd.DataFrame)
    written = pd.read_csv(tmp_path / "run" / "sessions.csv")
    assert written["session"].tolist() == [0, 1]
    pd.testing.assert_frame_equal(
        table[METRICS].reset_index(drop=True).astype(float), written[METRICS].astype(float), rtol=1e-6
    )
    assert (written["method"] == "simplecil").all() and table.attrs["run_dir"] == str(tmp_path / "run")


def test_run_takes_a_composed_config_that_stays_correct_after_another_compose(tmp_path):
    cfg = pilot.compose(FAST + TWO_SESSIONS)
    pilot.compose(FAST + ["+method=l2p", "dataset.num_classes=4"])  # replaces Hydra's current config
    table = pilot.run(cfg=cfg, run_dir=tmp_path / "run")
    written = pd.read_csv(tmp_path / "run" / "sessions.csv")
    assert (written["method"] == "simplecil").all() and (written["dataset"] == "synthetic").all()
    assert written["n_seen"].tolist() == [5, 10] and table["acc"].tolist() == pytest.approx(written["acc"].tolist())


def test_run_without_a_run_dir_uses_the_command_line_default(tmp_path):
    table = pilot.run(FAST + TWO_SESSIONS + [f"paths.results_dir={tmp_path}"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert table.attrs["run_dir"] == str(run_dir)
    assert run_dir.name.endswith("_simplecil_synthetic_s1993") and (run_dir / "sessions.csv").is_file()


def test_pilot_run_is_the_api_function_and_the_loop_lives_in_pilot_loop():
    from pilot import run
    from pilot.api import run as api_run

    assert run is pilot.run is api_run and run_loop.__module__ == "pilot.loop"
    with pytest.raises(TypeError, match="either overrides"):
        pilot.run()
    with pytest.raises(TypeError, match="either overrides"):
        pilot.run(FAST, cfg=DictConfig({}))
    with pytest.raises(TypeError, match="list of strings"):
        pilot.run("+method=simplecil")


def test_compose_returns_a_validated_config():
    cfg = pilot.compose(FAST + ["+method=l2p", "method.epochs=3"])
    assert isinstance(cfg, DictConfig) and "hydra" not in cfg
    assert cfg.method._target_ == "pilot.learners.l2p.L2P" and cfg.method.epochs == 3
    assert dict(cfg.labels) == {"method": "l2p", "dataset": "synthetic", "backbone": "vit_test_tiny"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+method=no_such_method"], "Could not find 'method/no_such_method'"),
        (["+method=l2p", "dataset=no_such_dataset"], "Could not find 'dataset/no_such_dataset'"),
        (["+method=l2p", "method.no_such_key=1"], "Could not override 'method.no_such_key'"),
        (["+method=l2p", "method.epochs=="], "Error parsing override"),
        (["+method=l2p", "method.epochs=0"], "method.epochs=0 is not allowed"),
        ([], "No method chosen"),
    ],
)
def test_a_bad_override_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        pilot.compose(overrides)


def test_import_pilot_and_compose_stay_cheap():
    """``import pilot`` loads neither Hydra nor torch; ``pilot.compose`` loads Hydra, not torch."""
    code = (
        "import sys, pilot; assert not {'torch', 'hydra', 'pandas'} & set(sys.modules), sorted(sys.modules); "
        "pilot.compose(['+method=simplecil']); assert 'torch' not in sys.modules; print(pilot.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pilot.__version__
