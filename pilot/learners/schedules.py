"""Learning-rate schedules that torch does not ship, as factories for YAML (``_partial_: true``).

A learner calls ``scheduler(optimizer)`` once per session and steps it once per epoch, after the
epoch's last batch (:func:`pilot.learners.training.train_epochs`): the lr used during epoch ``e``
(0-based) is ``lr_0 * factor(e)``.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pilot.schema import PositiveInt


def coda_cosine_factor(epoch: int, epochs: int, shifted: bool = True) -> float:
    """CODA-Prompt's lr factor for epoch ``epoch`` (0-based) of ``K = epochs`` (docs/methods.md §3.2).

    ``shifted=True`` (default), the schedule that CODA-Prompt's code and LAMDA-PILOT actually run::

        factor_0 = 1,   factor_e = cos(99 * pi * (e - 1) / (200 * (K - 1))),   e = 1 .. K-1

    Their ``CosineSchedule`` is an old-style scheduler whose constructor calls ``step(0)`` and then
    resets ``last_epoch`` to -1, so the first ``step()`` (after epoch 0) sets epoch index 0 again:
    epochs 0 and 1 both run at ``lr_0`` and the last epoch at ``cos(99 pi (K-2) / (200 (K-1)))``
    (K = 5: 1, 1, 0.9254, 0.7126, 0.3935; K = 20: last 0.0974; K = 50: last 0.0475).

    ``shifted=False``, the formula as written, without the shift::

        factor_e = cos(99 * pi * e / (200 * (K - 1))),   e = 0 .. K-1

    so the last epoch runs at ``cos(0.495 pi) ~ 0.016``.

    ``K = 1``: the factor is 1 (the reference would divide by zero); ``K = 2`` shifted: 1, 1.
    """
    if epochs <= 1:
        return 1.0
    if shifted:
        if epoch <= 0:
            return 1.0
        epoch -= 1
    return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def coda_cosine(optimizer: Optimizer, epochs: PositiveInt, shifted: bool = True) -> LambdaLR:
    """CODA's cosine schedule over ``epochs`` epochs, stepped once per epoch (:func:`coda_cosine_factor`).

    YAML: ``scheduler: {_target_: pilot.learners.schedules.coda_cosine, _partial_: true,
    epochs: ${method.epochs}, shifted: true}``. ``shifted=True`` is CODA's and LAMDA-PILOT's schedule
    (epochs 0 and 1 at ``lr_0``); ``shifted=False`` the formula without the one-epoch shift
    (docs/methods.md §3.2).
    """
    return LambdaLR(optimizer, partial(coda_cosine_factor, epochs=int(epochs), shifted=bool(shifted)))
