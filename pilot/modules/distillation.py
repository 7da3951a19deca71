"""Distillation and cross-entropy terms for imbalanced class-incremental training.

PILOT's plain distillation term (``_KD_loss``) is :func:`pilot.learners.replay.kd_loss`. ``dakd_loss``
is the distribution-aware variant of DGR (He & Zhu,
"Gradient Reweighting: Towards Imbalanced Class-Incremental Learning", CVPR 2024; the authors' code,
``src/approach/DGR.py`` ``_DAKD`` of github.com/JiangpengHe/imbalanced_cil); ``logit_adjusted_cross_entropy``
is the prior-regularised softmax of DGR (PILOT ``models/dgr.py`` ``regularized_cn``; Menon et al.,
"Long-tail learning via logit adjustment", ICLR 2021). All run in float32 whatever the autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pilot.modules.precision import float32_compute


def normalized_entropy(counts: torch.Tensor) -> float:
    """rho = H(p) / log K of ``counts`` ``[K]`` made a distribution after adding 0.001 to every count
    (the authors' ``measure_imbalance``): 1 for equal counts, smaller the more they differ."""
    p = counts.double() + 0.001
    p = p / p.sum()
    return float(-(p * p.log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0


@float32_compute
def dakd_loss(
    logits: torch.Tensor, old_logits: torch.Tensor, lost_counts: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Distribution-aware KD (DGR's DAKD): the old classes whose training data was lost the most keep
    their old logits the most.

        pi = n_lost / sum(n_lost),  pi <- pi / ||pi||_2,   z_mix = pi * z + (1 - pi) * z_old  (per class)
        L_DAKD = -(1/B) sum_i sum_c q_ic [rho log softmax(z / T) + (1 - rho) log softmax(z_mix / T)]_ic

    with ``q = softmax(z_old / T)`` and ``rho = normalized_entropy(n_lost)``. ``lost_counts`` ``[C]``:
    per old class, its training images minus those still in the exemplar memory. Equal losses give
    rho = 1 and ``L_DAKD = L_KD`` (:func:`pilot.learners.replay.kd_loss`) exactly (balanced datasets
    with an equal memory per class).
    """
    z, z_old = logits.float(), old_logits.float()
    log_p = F.log_softmax(z / temperature, dim=1)
    total = float(lost_counts.sum())
    if total > 0 and not bool((lost_counts == lost_counts[0]).all()):  # else rho = 1: the KD term alone
        rho = normalized_entropy(lost_counts)
        prior = lost_counts.to(z) / total
        prior = prior / prior.norm()
        mixed = prior * z + (1 - prior) * z_old
        log_p = rho * log_p + (1 - rho) * F.log_softmax(mixed / temperature, dim=1)
    q = F.softmax(z_old / temperature, dim=1)
    return -(q * log_p).sum() / z.shape[0]


@float32_compute
def logit_adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy on logits shifted by the log prior of the training set:

        L = CE(z + log pi, y),   pi_c = n_c / sum_k n_k

    ``class_counts`` ``[C]``: training images of every class in the current training set (new data and
    exemplars). A class with no image gets log 0 = -inf: it is never predicted and receives no gradient.
    """
    log_prior = (class_counts.double() / class_counts.sum()).float().log().to(logits.device)
    return F.cross_entropy(logits.float() + log_prior, labels)
