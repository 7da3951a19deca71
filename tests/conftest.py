"""Shared fixtures: compose configs exactly as ``python -m pilot.train`` does, and run them."""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a busy 2-core machine
# spinning threads make small tensor ops up to ~100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import pilot.train  # noqa: E402,F401  (registers the config resolvers)
from pilot.config import CONFIG_DIR  # noqa: E402
from pilot.run import run  # noqa: E402

# A fast test setting: tiny random ViT, synthetic data, CSV only, no progress bars, on the CPU.
FAST = ["backbone=vit_test_tiny", "dataset=synthetic", "logger=csv", "runtime.device=cpu",
        "runtime.progress=false", "runtime.cpu_threads=2"]


def compose_config(overrides: list[str], results_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` and register it as the current Hydra config
    (so ``${hydra:...}`` labels resolve), as the ``@hydra.main`` entry point would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        extra = [f"paths.results_dir={results_dir}"] if results_dir is not None else []
        cfg = compose("train", overrides=overrides + extra, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_config(overrides: list[str], run_dir: Path) -> pd.DataFrame:
    """Compose and run in ``run_dir``; returns the per-session records."""
    return run(compose_config(overrides, run_dir.parent), run_dir)


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)
