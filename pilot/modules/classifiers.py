"""Classifier heads that grow with the classes seen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.precision import FP32Linear, autocast_off


class CosineLinear(nn.Module):
    """Cosine classifier: ``logits_c = sigma * cos(x, W_c)`` over the rows grown so far.

    As PyCIL/LAMDA-PILOT's ``CosineLinear`` (docs/methods.md §0.5): ``sigma`` is a learnable scalar
    initialised to 1 (or fixed when ``learn_sigma=False``); when the classifier grows, old rows are
    kept and new rows are zero (to be overwritten by prototypes) or U(-1/sqrt(d), 1/sqrt(d)) (for a
    head that is trained). Prototype rows need no normalisation: cosine scoring ignores their norm.
    """

    sigma: nn.Parameter | None
    fixed_sigma: torch.Tensor

    def __init__(self, in_features: int, learn_sigma: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.zeros(0, in_features))
        sigma = torch.ones(1)
        self.sigma = nn.Parameter(sigma) if learn_sigma else None
        if not learn_sigma:
            self.register_buffer("fixed_sigma", sigma)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, total: int, init: str = "zeros") -> None:
        """Extend to ``total`` rows; ``init`` = ``zeros`` (prototype rows) or ``uniform`` (trainable)."""
        extra = total - self.num_classes
        if extra <= 0:
            return
        new = torch.zeros(extra, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        if init == "uniform":
            bound = 1.0 / math.sqrt(self.in_features)
            new.uniform_(-bound, bound)
        elif init != "zeros":
            raise ValueError(f"init={init!r}: use zeros or uniform")
        self.weight = nn.Parameter(torch.cat([self.weight.data, new]), requires_grad=self.weight.requires_grad)

    @torch.no_grad()
    def assign(self, rows: range, vectors: torch.Tensor) -> None:
        """Write ``vectors`` into the rows ``rows`` (e.g. class prototypes)."""
        self.weight[rows.start : rows.stop] = vectors.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine logits in float32, also under autocast (bf16 would round cosines to ~0.004)."""
        sigma = self.sigma if self.sigma is not None else self.fixed_sigma
        with autocast_off(x.device):
            return sigma * F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """Mean feature of each class in ``classes`` (the unnormalised "replace_fc" prototype):

        mu_c = (1 / |X_c|) sum_{x in X_c} f(x)

    ``features`` ``[N, D]``, ``labels`` ``[N]`` all within ``classes``; returns ``[len(classes), D]``.
    """
    offset = labels - classes.start
    if offset.numel() and (offset.min() < 0 or offset.max() >= len(classes)):
        raise ValueError(f"labels outside {classes}")
    sums = torch.zeros(len(classes), features.shape[1], device=features.device, dtype=torch.float64)
    sums.index_add_(0, offset, features.double())
    counts = torch.bincount(offset, minlength=len(classes)).clamp_min(1).unsqueeze(1)
    return (sums / counts).float()


def linear_head(dim: int, num_classes: int, init: str = "timm") -> FP32Linear:
    """A linear classifier head, computed in float32 under autocast (:class:`FP32Linear`).

    ``init``: ``timm`` = trunc-normal std .02, bias 0 (the head of PILOT's L2P/DualPrompt ViTs and
    SLCA's per-session heads); ``torch`` = PyTorch's default ``nn.Linear`` init (CODA-Prompt).
    """
    head = FP32Linear(dim, num_classes)
    if init == "timm":
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    elif init != "torch":
        raise ValueError(f"init={init!r}: use timm or torch")
    return head
