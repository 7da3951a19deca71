"""Per-class Mahalanobis classifier with shrunk, normalised covariances (FeCAM).

Goswami et al., "FeCAM: Exploiting the Heterogeneity of Class Distributions in Exemplar-Free
Continual Learning", NeurIPS 2023 (official code dipamgoswami/FeCAM: ``FeCAM_vit_*.py`` for
pre-trained ViTs, ``models/base.py``); LAMDA-PILOT ``models/fecam.py``; docs/methods.md §7.
For each class c with features ``X_c`` (``n_c`` rows), a centre ``m_c``, a matrix ``S_c`` and
its pseudo-inverse ``P_c = pinv(S_c)``; a feature ``f`` scores

    d_c(f) = (f_hat - m_c)^T P_c (f_hat - m_c),     f_hat = f / ||f||,     prediction argmin_c d_c

Two recipes for ``m_c`` and ``S_c`` (``Sigma`` = unbiased covariance, ``torch.cov`` / ``np.cov``):

``pilot`` (LAMDA-PILOT ``replace_fc`` / ``shrink_cov`` / ``_mahalanobis``)
    ``Sigma`` of the raw features; ``S_c = corrcoef(Sigma + alpha I)`` (alpha = 100), where
    ``torch.corrcoef`` treats the *rows* of its argument as variables, i.e. it returns the
    correlation matrix between the rows of ``Sigma + alpha I`` (not ``Sigma / (s s^T)``);
    ``m_c = mu_c / ||mu_c||`` with ``mu_c`` the mean of the raw features.
``paper`` (official ``FeCAM_vit_cifar100.py``: ``shrink_cov`` with alpha1 = 1, alpha2 = 0, ``normalize_cov``)
    features are l2-normalised first; ``Sigma`` of the normalised features;
    shrinkage ``Sigma_s = Sigma + gamma1 V1 I + gamma2 V2 (1 - I)`` with ``V1`` the mean diagonal
    entry and ``V2`` the mean of the non-zero off-diagonal entries (paper Eq. 6; gamma1 = 1,
    gamma2 = 0 for ViTs in the official code); ``S_c = Sigma_s / (s s^T)``, ``s = sqrt(diag Sigma_s)``;
    ``m_c`` = mean of the normalised features (not normalised again).

Statistics and pseudo-inverses are computed in float64 and stored in float32 (as the reference,
which keeps float32 matrices); distances are computed in float64. Memory: ``C * D^2 * 4`` bytes (ViT-B: 2.4 MB
per class, 472 MB for 200 classes, in the checkpoint too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pilot.modules.gaussian import ClassStore, class_statistics
from pilot.modules.precision import float32_compute


def _eye_like(mats: torch.Tensor) -> torch.Tensor:
    return torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)


def shrink_identity(covs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Sigma + alpha I`` (LAMDA-PILOT ``shrink_cov`` with alpha = 100); ``covs`` ``[..., D, D]``."""
    return covs + alpha * _eye_like(covs)


def shrink_scaled(covs: torch.Tensor, gamma1: float, gamma2: float) -> torch.Tensor:
    """FeCAM's shrinkage ``Sigma + gamma1 V1 I + gamma2 V2 (1 - I)`` (paper Eq. 6, official ``shrink_cov``).

    ``V1``: mean of the diagonal; ``V2``: mean of the off-diagonal entries that are not exactly zero
    (the official code's mask), 0 when there are none. ``covs`` ``[..., D, D]``.
    """
    eye = _eye_like(covs)
    v1 = covs.diagonal(dim1=-2, dim2=-1).mean(-1)
    off = covs * (1 - eye)
    count = (off != 0).sum(dim=(-2, -1)).clamp_min(1)
    v2 = off.sum(dim=(-2, -1)) / count
    return covs + gamma1 * v1[..., None, None] * eye + gamma2 * v2[..., None, None] * (1 - eye)


def row_correlation(mats: torch.Tensor) -> torch.Tensor:
    """``torch.corrcoef`` of each ``[D, N]`` matrix (rows = variables, columns = observations), batched,
    clipped to [-1, 1] as ``torch.corrcoef``. ``mats`` ``[..., D, N]`` -> ``[..., D, D]``."""
    centred = mats - mats.mean(dim=-1, keepdim=True)
    cov = centred @ centred.transpose(-2, -1)
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    return (cov / (std[..., :, None] * std[..., None, :])).clamp(-1, 1)


def normalise_covariance(covs: torch.Tensor) -> torch.Tensor:
    """``Sigma / (s s^T)`` with ``s = sqrt(diag Sigma)`` (official ``normalize_cov``): a correlation matrix."""
    std = covs.diagonal(dim1=-2, dim2=-1).sqrt()
    return covs / (std[..., :, None] * std[..., None, :])


@float32_compute
def fecam_statistics(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: range,
    covariance: str = "pilot",
    alpha: float = 100.0,
    gamma1: float = 1.0,
    gamma2: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``m_c`` ``[C, D]`` and matrices ``S_c`` ``[C, D, D]`` (float64) of ``classes`` under the
    ``covariance`` recipe (``pilot`` or ``paper``, module docstring); ``alpha`` is used by ``pilot``,
    ``gamma1``/``gamma2`` by ``paper``."""
    if covariance == "pilot":
        means, covs = class_statistics(features.double(), labels, classes, shrink=0.0)
        return F.normalize(means, dim=1), row_correlation(shrink_identity(covs, alpha))
    if covariance == "paper":
        normed = F.normalize(features.double(), dim=1)
        means, covs = class_statistics(normed, labels, classes, shrink=0.0)
        return means, normalise_covariance(shrink_scaled(covs, gamma1, gamma2))
    raise ValueError(f"covariance={covariance!r}: use pilot or paper")


@float32_compute
def mahalanobis_distances(
    features: torch.Tensor, centres: torch.Tensor, precisions: torch.Tensor, class_chunk: int = 64
) -> torch.Tensor:
    """``d[b, c] = (f_hat_b - m_c)^T P_c (f_hat_b - m_c)``, ``f_hat`` = l2-normalised feature.

    ``features`` ``[B, D]``, ``centres`` ``[C, D]``, ``precisions`` ``[C, D, D]``. Computed in float64
    (TF32 would round the products to ~5e-4), classes in chunks of ``class_chunk`` (each holds
    ``chunk * (2 B D + D^2)`` doubles). Returns float32 ``[B, C]``.
    """
    x = F.normalize(features.double(), dim=1)
    out = []
    for start in range(0, centres.shape[0], class_chunk):
        diff = x.unsqueeze(0) - centres[start : start + class_chunk].double().unsqueeze(1)  # [c, B, D]
        out.append((torch.bmm(diff, precisions[start : start + class_chunk].double()) * diff).sum(-1).T)
    return torch.cat(out, dim=1).float() if out else features.new_zeros(features.shape[0], 0).float()


class ClassMahalanobis(ClassStore):
    """Growing store of class centres and pseudo-inverse matrices (float32 buffers, so in ``state_dict``).

    ``grow(total)`` adds zero rows for new classes (structure only); ``update`` computes the statistics
    of a range of classes from their features (:func:`fecam_statistics`, then ``pinv`` in float64);
    ``forward(features)`` returns the distances ``[B, C]``.
    """

    centres: torch.Tensor  # [C, D]
    precisions: torch.Tensor  # [C, D, D]
    rows = ("centres", "precisions")

    def __init__(
        self, dim: int, covariance: str = "pilot", alpha: float = 100.0, gamma1: float = 1.0, gamma2: float = 0.0
    ) -> None:
        super().__init__()
        self.dim, self.covariance = dim, covariance
        self.alpha, self.gamma1, self.gamma2 = float(alpha), float(gamma1), float(gamma2)
        self.register_buffer("centres", torch.zeros(0, dim))
        self.register_buffer("precisions", torch.zeros(0, dim, dim))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        """Compute and store centres and ``pinv(S_c)`` of ``classes`` (see :func:`fecam_statistics`)."""
        dev = self.centres.device
        centres, mats = fecam_statistics(
            features.to(dev), labels.to(dev), classes, self.covariance, self.alpha, self.gamma1, self.gamma2
        )
        self.write(classes, centres=centres, precisions=torch.linalg.pinv(mats, hermitian=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances ``[B, C]`` to every stored class."""
        return mahalanobis_distances(features, self.centres, self.precisions)
