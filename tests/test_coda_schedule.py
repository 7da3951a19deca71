"""CODA-Prompt's cosine learning-rate schedule (docs/methods.md §3.2), stepped as our training loop steps it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, compose_config
from hydra.utils import instantiate

from pilot.learners.schedules import coda_cosine


def epoch_lrs(epochs: int, lr0: float = 0.001, **kwargs) -> list[float]:
    """The lr used during every epoch, with the scheduler stepped after each epoch's batches as in
    :func:`pilot.learners.training.train_epochs`."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=lr0)
    scheduler = coda_cosine(optimizer, epochs=epochs, **kwargs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return lrs


def shifted_formula(epochs: int, lr0: float) -> list[float]:
    """LAMDA-PILOT's CosineSchedule: epochs 0 and 1 at lr0, then cos(99 pi (e-1) / (200 (K-1)))."""
    if epochs == 1:
        return [lr0]
    return [lr0] + [lr0 * math.cos(99 * math.pi * (e - 1) / (200 * (epochs - 1))) for e in range(1, epochs)]


def unshifted_formula(epochs: int, lr0: float) -> list[float]:
    if epochs == 1:
        return [lr0]
    return [lr0 * math.cos(99 * math.pi * e / (200 * (epochs - 1))) for e in range(epochs)]


@pytest.mark.parametrize("epochs", [1, 2, 5, 20, 50])
def test_default_schedule_is_shifted_by_one_epoch(epochs):
    lrs = epoch_lrs(epochs)
    assert len(lrs) == epochs
    assert lrs == pytest.approx(shifted_formula(epochs, 0.001), rel=1e-12, abs=1e-15)
    assert lrs[0] == 0.001
    if epochs >= 2:
        assert lrs[1] == pytest.approx(0.001)  # epochs 0 and 1 both at lr0
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("epochs", [1, 2, 5, 20, 50])
def test_unshifted_option_is_the_formula_as_written(epochs):
    lrs = epoch_lrs(epochs, shifted=False)
    assert lrs == pytest.approx(unshifted_formula(epochs, 0.001), rel=1e-12, abs=1e-15)


def test_pinned_values_of_the_reference_scheduler():
    # Measured on LAMDA-PILOT's CosineSchedule with K = 5.
    assert epoch_lrs(5, lr0=1.0) == pytest.approx([1.0, 1.0, 0.9254, 0.7126, 0.3935], abs=1e-4)
    assert epoch_lrs(5) == pytest.approx([0.001 * f for f in (1.0, 1.0, 0.9254, 0.7126, 0.3935)], abs=1e-7)
    assert epoch_lrs(20, lr0=1.0)[-1] == pytest.approx(0.0974, abs=1e-4)
    assert epoch_lrs(50, lr0=1.0)[-1] == pytest.approx(0.0475, abs=1e-4)  # 0.04743
    assert epoch_lrs(1, lr0=1.0) == [1.0]  # K = 1: the reference would divide by zero
    assert epoch_lrs(2, lr0=1.0) == [1.0, 1.0]


def test_pinned_values_of_the_unshifted_option():
    assert epoch_lrs(5, lr0=1.0, shifted=False) == pytest.approx([1.0, 0.9254, 0.7126, 0.3935, 0.0157], abs=1e-4)
    assert epoch_lrs(20, lr0=1.0, shifted=False)[-1] == pytest.approx(0.0157, abs=1e-4)
    assert epoch_lrs(50, lr0=1.0, shifted=False)[-1] == pytest.approx(0.0157, abs=1e-4)
    assert epoch_lrs(1, lr0=1.0, shifted=False) == [1.0]
    assert epoch_lrs(2, lr0=1.0, shifted=False) == pytest.approx([1.0, 0.0157], abs=1e-4)


def test_coda_config_uses_the_shifted_schedule(tmp_path):
    cfg = compose_config(FAST + ["+method=coda"], tmp_path)
    assert cfg.method.scheduler.shifted is True
    factory = instantiate(cfg.method.scheduler)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0)
    scheduler = factory(optimizer)
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == [1.0, 1.0]
    assert lrs[2] == pytest.approx(math.cos(99 * math.pi / (200 * (cfg.method.epochs - 1))))
