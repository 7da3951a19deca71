"""Running statistics for a ridge-regression readout on random-projected features (RanPAC).

McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning",
NeurIPS 2023; LAMDA-PILOT ``models/ranpac.py`` (``setup_RP``, ``replace_fc``,
``optimise_ridge_parameter``); docs/methods.md §7. With a frozen feature ``f`` (``[d]``), a fixed
random matrix ``W`` (``[d, M]``, entries N(0, 1)) and the one-hot label ``y`` over all ``K`` classes
of the scenario:

    h   = ReLU(f W)                                 (the expanded feature, [M])
    G   = sum_i h_i h_i^T        [M, M]             (Gram matrix of every sample seen so far)
    Q   = sum_i h_i y_i^T        [M, K]
    W_o = (G + lambda I)^-1 Q    [M, K]             (torch.linalg.solve, as the reference)

``G`` and ``Q`` are sums, so :meth:`RidgeStatistics.update` only adds to them: sessions add up, and
so would processes (an all-reduce SUM of the per-process increments gives the same ``G`` and ``Q``);
:meth:`RidgeStatistics.solve` is separate. ``lambda`` is chosen per session by :func:`select_ridge`,
which needs the whole session's features in loader order (across processes: gather them first).

Precision: ``h``, ``G``, ``Q`` and every solve are float64 (also under autocast, and unaffected by
TF32). The reference uses float32 throughout; its ``G`` then differs from the exact sum by ~1e-7
relative, which ``(G + lambda I)^-1`` amplifies by up to ``eig_max(G) / lambda`` (scripts/fidelity/
ranpac.py measured 3e-3 relative on W_o at M = 2,000, lambda = 1e3). On an H200 with M = 10,000 and
5,000 samples per session the lambda search (17 solves) takes ~1.1 s and the solve 0.06 s.
Memory: ``G`` is ``M^2 * 8`` bytes (M = 10,000: 800 MB, in the checkpoint too); the lambda search
holds three more such matrices while it runs (peak 4.2 GB on the GPU at M = 10,000).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.precision import float32_compute

RIDGE_CANDIDATES: tuple[float, ...] = tuple(10.0**k for k in range(-8, 9))  # the reference's 10^-8 .. 10^8


@float32_compute
def random_relu_features(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``h = ReLU(f W)`` in float64 (also under autocast, and unaffected by TF32): ``features`` ``[N, d]``,
    ``projection`` ``[d, M]`` -> ``[N, M]``."""
    return F.relu(features.double() @ projection.double())


def ridge_solution(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge I)^-1 Q`` by ``torch.linalg.solve`` (LU) in ``gram``'s dtype: ``[M, K]``."""
    system = gram.clone()
    system.diagonal().add_(ridge)
    return torch.linalg.solve(system, targets.to(gram.dtype))


@torch.no_grad()
def select_ridge(
    h: torch.Tensor,
    onehot: torch.Tensor,
    candidates: Sequence[float] = RIDGE_CANDIDATES,
    fit_fraction: float = 0.8,
) -> tuple[float, torch.Tensor]:
    """The reference's choice of lambda on one session's expanded features (in loader order).

    Fits ``(G_fit + lambda I)^-1 Q_fit`` on the first ``int(fit_fraction * N)`` rows and measures the
    mean squared error of ``h W`` against ``onehot`` on the remaining rows, for every candidate; returns
    the candidate with the lowest error (the first one on ties, as ``np.argmin``) and all errors
    (float64, ``[len(candidates)]``). A non-finite error counts as +inf (the reference's ``np.argmin``
    would pick a NaN). ``h`` ``[N, M]``, ``onehot`` ``[N, K]``; computed in float64.
    """
    h64, y64 = h.double(), onehot.double()
    n_fit = int(h64.shape[0] * fit_fraction)
    fit, held = h64[:n_fit], h64[n_fit:]
    gram, targets = fit.T @ fit, fit.T @ y64[:n_fit]
    losses = torch.stack([F.mse_loss(held @ ridge_solution(gram, targets, lam), y64[n_fit:]) for lam in candidates])
    finite = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
    return float(candidates[int(torch.argmin(finite))]), losses


class RidgeStatistics(nn.Module):
    """The fixed projection ``W`` and the running sums ``G``, ``Q`` (buffers, so in ``state_dict``).

    ``projection`` float32 ``[d, M]``, drawn from N(0, 1) with ``generator`` (None: the global torch
    generator, as the reference); ``gram`` float64 ``[M, M]``; ``targets`` float64 ``[M, K]`` with one
    column per class of the scenario (columns of unseen classes stay zero).
    """

    projection: torch.Tensor
    gram: torch.Tensor
    targets: torch.Tensor

    def __init__(
        self, in_dim: int, projection_dim: int, num_classes: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("projection", torch.randn(in_dim, projection_dim, generator=generator))
        self.register_buffer("gram", torch.zeros(projection_dim, projection_dim, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(projection_dim, num_classes, dtype=torch.float64))

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """``h = ReLU(f W)`` ``[N, M]`` in float64."""
        return random_relu_features(features, self.projection)

    def onehot(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot targets over all ``num_classes`` (float64)."""
        return F.one_hot(labels.long(), self.num_classes).to(torch.float64)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``sum h h^T`` and ``sum h y^T`` of these samples to ``G`` and ``Q`` (nothing else changes)."""
        h = self.expand(features.to(self.projection.device))
        self.gram += h.T @ h
        self.targets += h.T @ self.onehot(labels.to(h.device))

    @torch.no_grad()
    def select_ridge(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        candidates: Sequence[float] = RIDGE_CANDIDATES,
        fit_fraction: float = 0.8,
    ) -> tuple[float, torch.Tensor]:
        """:func:`select_ridge` on these samples (one session's features, in loader order)."""
        h = self.expand(features.to(self.projection.device))
        return select_ridge(h, self.onehot(labels.to(h.device)), candidates, fit_fraction)

    @torch.no_grad()
    def solve(self, ridge: float) -> torch.Tensor:
        """``W_o = (G + ridge I)^-1 Q``: float64 ``[M, K]``."""
        return ridge_solution(self.gram, self.targets, ridge)
