"""Shared fixtures: compose configs exactly as ``python -m pilot.train`` does, and run them."""

from __future__ import annotations

import os
import tempfile

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a busy 2-core machine
# spinning threads make small tensor ops up to ~100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Offline W&B stages tables and artifacts under the user's data dir until `wandb sync`: keep test
# runs out of $HOME.
os.environ.setdefault("WANDB_DATA_DIR", tempfile.mkdtemp(prefix="pilot-wandb-"))

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import pilot.train  # noqa: E402,F401  (registers the config resolvers)
from pilot.config import compose_config as compose  # noqa: E402
from pilot.loop import run  # noqa: E402
from pilot.registry import learners  # noqa: E402
from pilot.schema import signature_of  # noqa: E402

# A fast test setting: tiny random ViT, synthetic data, CSV only, no progress bars, on the CPU.
FAST = [
    "backbone=vit_test_tiny",
    "dataset=synthetic",
    "logger=csv",
    "runtime.device=cpu",
    "runtime.progress=false",
    "runtime.cpu_threads=2",
]


def compose_config(overrides: list[str], results_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` as ``python -m pilot.train`` would (see :func:`pilot.config.compose_config`)."""
    extra = [f"paths.results_dir={results_dir}"] if results_dir is not None else []
    return compose(overrides + extra)


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


# What a learner needs to run on the tiny ViT (width 48) beyond one epoch: CODA's pool stays orthogonal
# in 48 dims, and its batches must exist with drop_last (tests/test_prompt_learners.py).
SMALL = {
    "coda": ["method.pool_size=12", "method.batch_size=8"],
    "lae": ["method.num_freeze_epochs=0"],  # with 1 epoch, the default 3 frozen epochs would never train the PET
    "ranpac": ["method.projection_dim=64"],  # the reference M = 10,000 makes each session's ridge search take minutes
    "ranpac_mini": ["method.projection_dim=128"],
}


def small_overrides(name: str) -> list[str]:
    """``+method=name`` with every ``epochs`` / ``*_epochs`` parameter of the learner set to 1."""
    params = signature_of(learners()[name].target).params
    epochs = [f"++method.{p}=1" for p in params if p == "epochs" or p.endswith("_epochs")]
    return [f"+method={name}", *epochs, *SMALL.get(name, [])]
