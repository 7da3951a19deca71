"""Shared fixtures: compose configs exactly as ``python -m pilot.train`` does, and run them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import pilot.train  # noqa: F401  (registers the config resolvers)
from pilot.config import CONFIG_DIR
from pilot.run import run

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
