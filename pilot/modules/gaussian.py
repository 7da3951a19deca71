"""Per-class Gaussian statistics of features, and sampling from them.

Used by SLCA's classifier alignment (docs/methods.md §6.2) and meant for the later learners that model
classes as Gaussians (FeCAM, MOS, RanPAC). For the features ``X_c`` (``n_c`` rows) of class c:

    mu_c    = (1 / n_c) sum_i x_i
    Sigma_c = (1 / (n_c - 1)) sum_i (x_i - mu_c)(x_i - mu_c)^T  +  shrink * I,   shrink = 1e-4

in float64, as SLCA computes them (``torch.cov(...float64...) + 1e-4 * eye``, LAMDA-PILOT
``models/slca.py: _compute_class_mean``; GengDavid/SLCA). ``n_c - 1`` is clamped to 1 for a class
with a single sample (``torch.cov`` would give NaN there).

Sampling draws ``x = s_c * mu_c + L_c z`` with ``z ~ N(0, I)`` and ``L_c`` the Cholesky factor of
``Sigma_c`` (what ``torch.distributions.MultivariateNormal(mu, Sigma)`` does), all classes at once
with one batched matmul; ``s_c`` is an optional per-class mean scale (SLCA's down-scaling of old
classes' means).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pilot.modules.precision import float32_compute


@float32_compute
def class_statistics(
    features: torch.Tensor, labels: torch.Tensor, classes: range, shrink: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``[C, D]`` and covariances ``[C, D, D]`` (float64) of the classes in ``classes``.

    Computed on the features' device without a loop over samples or classes: the centred features
    are scattered into a zero-padded ``[C, n_max, D]`` block (row = position within its class) and
    the C Gram matrices come from one batched matmul.
    """
    num, dim = features.shape
    c = len(classes)
    offset = labels.long() - classes.start
    if offset.numel() and (offset.min() < 0 or offset.max() >= c):
        raise ValueError(f"labels outside {classes}")
    x = features.double()
    counts = torch.bincount(offset, minlength=c)
    means = torch.zeros(c, dim, dtype=torch.float64, device=x.device).index_add_(0, offset, x)
    means /= counts.clamp_min(1).unsqueeze(1)
    centred = x - means[offset]
    order = torch.argsort(offset, stable=True)
    sorted_offset = offset[order]
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(num, device=x.device) - starts[sorted_offset]
    n_max = int(counts.max()) if num else 0
    padded = torch.zeros(c, n_max, dim, dtype=torch.float64, device=x.device)
    padded[sorted_offset, position] = centred[order]
    covs = padded.transpose(1, 2) @ padded
    covs /= (counts - 1).clamp_min(1).to(torch.float64).view(c, 1, 1)
    covs += shrink * torch.eye(dim, dtype=torch.float64, device=x.device)
    return means, covs


@float32_compute
def sample_gaussians(
    means: torch.Tensor,
    scale_tril: torch.Tensor,
    num_per_class: int,
    mean_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_per_class`` samples of each of the C Gaussians ``N(s_c * mu_c, L_c L_c^T)``.

    ``means`` ``[C, D]``, ``scale_tril`` ``[C, D, D]`` (Cholesky factors), ``mean_scale`` ``[C]`` or
    None. Returns samples ``[C * num_per_class, D]`` (class-major, not shuffled) in ``dtype`` and
    their class index ``0..C-1`` ``[C * num_per_class]``.
    """
    c, dim = means.shape
    mu = means.to(dtype)
    if mean_scale is not None:
        mu = mu * mean_scale.to(device=mu.device, dtype=dtype).unsqueeze(1)
    z = torch.randn(c, num_per_class, dim, device=means.device, dtype=dtype, generator=generator)
    samples = torch.baddbmm(mu.unsqueeze(1), z, scale_tril.to(dtype).transpose(1, 2))
    labels = torch.arange(c, device=means.device).repeat_interleave(num_per_class)
    return samples.reshape(c * num_per_class, dim), labels


def zero_rows_to(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """``tensor`` with zero rows (its dtype and device) appended up to ``total`` rows: a store's new classes."""
    return torch.cat([tensor, tensor.new_zeros(total - tensor.shape[0], *tensor.shape[1:])])


class ClassStore(nn.Module):
    """Per-class buffers, one row per class, that grow with the scenario (so they are in ``state_dict``).

    A subclass registers its buffers with zero rows and names them in ``rows``; ``grow(total)`` appends zero
    rows for the new classes (structure only, :meth:`pilot.learners.base.Learner.restore` replays it), and
    ``write(classes, name=values, ...)`` stores the statistics of a range of classes in each buffer's dtype."""

    rows: ClassVar[tuple[str, ...]]

    @property
    def num_classes(self) -> int:
        return getattr(self, self.rows[0]).shape[0]

    def grow(self, total: int) -> None:
        if total > self.num_classes:
            for name in self.rows:
                setattr(self, name, zero_rows_to(getattr(self, name), total))

    def write(self, classes: range, **values: torch.Tensor) -> None:
        for name, value in values.items():
            buffer = getattr(self, name)
            buffer[classes.start : classes.stop] = value.to(buffer.dtype)


class ClassGaussians(ClassStore):
    """Growing store of per-class means and full covariances (float64 buffers, so in ``state_dict``).

    ``grow(total)`` adds zero rows for new classes (structure only); ``update`` writes the
    statistics of a range of classes from their features; ``sample`` draws from them.
    Memory: ``C * D * D * 8`` bytes (ViT-B, 100 classes: 472 MB; 200 classes: 944 MB).
    """

    means: torch.Tensor  # [C, D] float64 buffer
    covs: torch.Tensor  # [C, D, D] float64 buffer
    rows = ("means", "covs")

    def __init__(self, dim: int, shrink: float = 1e-4) -> None:
        super().__init__()
        self.dim = dim
        self.shrink = float(shrink)
        self.register_buffer("means", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("covs", torch.zeros(0, dim, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        """Compute and store the statistics of ``classes`` (see :func:`class_statistics`)."""
        device = self.means.device
        means, covs = class_statistics(features.to(device), labels.to(device), classes, self.shrink)
        self.write(classes, means=means, covs=covs)

    def scale_tril(self, classes: range | None = None) -> torch.Tensor:
        """Cholesky factors (float64) of the covariances of ``classes`` (default: all)."""
        classes = classes if classes is not None else range(self.num_classes)
        return torch.linalg.cholesky(self.covs[classes.start : classes.stop])

    @torch.no_grad()
    def sample(
        self,
        num_per_class: int,
        classes: range | None = None,
        mean_scale: torch.Tensor | None = None,
        scale_tril: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_per_class`` samples of every class in ``classes`` (default: all), class-major.

        Returns samples ``[C * n, D]`` and their class labels (``classes.start + index``). Pass
        ``scale_tril`` (from :meth:`scale_tril`) to reuse the factorisation across calls.
        """
        classes = classes if classes is not None else range(self.num_classes)
        if scale_tril is None:
            scale_tril = self.scale_tril(classes)
        samples, index = sample_gaussians(
            self.means[classes.start : classes.stop], scale_tril, num_per_class, mean_scale, dtype, generator
        )
        return samples, index + classes.start
