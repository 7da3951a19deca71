"""Learning-rate schedules that torch does not ship, as factories for YAML (``_partial_: true``).

A learner calls ``scheduler(optimizer)`` once per session and steps it once per epoch
(:func:`pilot.learners.training.train_epochs`).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """CODA-Prompt's per-epoch factor (official ``CosineSchedule``; METHODS.md §3.2)::

        lr_e = lr_0 * cos(99 * pi * e / (200 * (K - 1))),   e = 0 .. K-1

    so the last epoch runs at cos(0.495 pi) ~ 0.016 lr_0; with ``K = 1`` the factor is 1.
    """
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def coda_cosine(optimizer: Optimizer, epochs: int) -> LambdaLR:
    """CODA's cosine schedule over ``epochs`` epochs (``scheduler: {_target_: pilot.learners.schedules.coda_cosine,
    _partial_: true, epochs: ${method.epochs}}``)."""
    return LambdaLR(optimizer, partial(coda_cosine_factor, epochs=int(epochs)))
