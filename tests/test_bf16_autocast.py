"""Every learner runs under bf16 autocast (forced on the CPU here; on CUDA it is the default).

Dtype mistakes of the bf16 path (bf16 features into float32 buffers, mixed-dtype concatenation,
cached bf16 outputs) show up on any device under autocast, so this guards the GPU default path on
machines without a GPU. Accuracy agreement between bf16 and fp32 is measured on the GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_config, small_overrides

from pilot.registry import learner_names
from pilot.runtime import Runtime

METHODS = learner_names()  # every registered learner (pilot.registry), built in or from an installed plugin


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    forced = property(lambda self: torch.bfloat16 if self.precision == "bf16" else None)
    monkeypatch.setattr(Runtime, "autocast_dtype", forced)


@pytest.mark.parametrize("method", METHODS)
def test_learner_runs_two_sessions_under_bf16_autocast(method, tmp_path, fast, bf16_on_cpu):
    # One epoch per training loop, plus what each learner needs on the tiny ViT (conftest.SMALL).
    overrides = fast + small_overrides(method) + ["dataset.num_classes=4", "scenario=b0inc2", "runtime.precision=bf16"]
    table = run_config(overrides, tmp_path / "run")
    sessions = pd.read_csv(tmp_path / "run" / "sessions.csv")
    assert sessions["n_seen"].tolist() == [2, 4]
    assert np.isfinite(sessions["acc"]).all() and sessions["acc"].between(0, 100).all()
    assert table["acc"].iloc[-1] == pytest.approx(sessions["acc"].iloc[-1], abs=1e-3)


def test_simplecil_bf16_and_fp32_agree(tmp_path, fast, bf16_on_cpu):
    base = fast + ["+method=simplecil", "scenario=b0inc2"]
    bf16 = run_config(base + ["runtime.precision=bf16"], tmp_path / "bf16")
    fp32 = run_config(base + ["runtime.precision=fp32"], tmp_path / "fp32")
    assert abs(bf16["acc"].iloc[-1] - fp32["acc"].iloc[-1]) <= 5.0  # 80 test images: 4 images at most
