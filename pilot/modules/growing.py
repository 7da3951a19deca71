"""Networks that grow by one feature extractor per session (DER, MEMO) and their classifiers.

DER (Yan et al., "DER: Dynamically Expandable Representation for Class Incremental Learning", CVPR 2021)
and MEMO (Zhou et al., "A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental Learning",
ICLR 2023) as LAMDA-PILOT builds them (``utils/inc_net.py``: ``DERNet``, ``AdaptiveNet``): session T adds
a feature extractor f_T (DER: a whole backbone; MEMO: the last blocks of a ViT) and freezes f_0..f_{T-1}.

* super-feature ``phi(x) = [f_0(x); ...; f_T(x)]``, ``[B, (T+1) d]`` (:func:`concat_features`);
* classifier ``W phi(x) + b`` over all seen classes; when it grows, the old ``W``/``b`` fill the
  top-left block and the rest is drawn fresh (:func:`grow_linear`, PILOT ``update_fc``);
* auxiliary classifier on the newest extractor, ``W_aux f_T(x) + b_aux`` over ``|C_T| + 1`` classes:
  the session's classes and one class for "any old class" (:func:`auxiliary_targets`);
* training loss (T > 0) ``CE(W phi(x) + b, y) + lambda_a CE(W_aux f_T(x) + b_aux, y_aux)``
  (:func:`auxiliary_loss`); session 0 trains the classifier's CE alone (PILOT ``_init_train``).

:class:`GrowingClassifier` holds both heads; FOSTER's expansion phase can use the same pieces.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.precision import FP32Linear


def freeze(module: nn.Module) -> nn.Module:
    """Stop ``module``'s gradients and put it in eval mode (DER/MEMO: older extractors). Its owner's
    ``train()`` would switch it back: learners call :func:`keep_frozen_in_eval` after ``train()``."""
    module.requires_grad_(False)
    return module.eval()


def keep_frozen_in_eval(modules: Iterable[nn.Module]) -> None:
    """Eval mode for every module of ``modules`` without a trainable parameter (PILOT puts older
    extractors in eval mode every epoch: fixed BatchNorm statistics, no dropout)."""
    for module in modules:
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def concat_features(outputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """``phi(x) = [f_0(x); ...; f_T(x)]``: the extractors' features side by side, ``[B, sum d_i]``."""
    return torch.cat(list(outputs), dim=1)


def grow_linear(
    old: nn.Linear | None, in_features: int, out_features: int, device: torch.device | str | None = None
) -> FP32Linear:
    """A linear layer ``in_features -> out_features`` whose top-left block is ``old`` (PILOT ``update_fc``).

    Fresh entries use PILOT's ``SimpleLinear`` init: ``W ~ U(-sqrt(3 / in), sqrt(3 / in))`` (Kaiming
    uniform, gain 1, fan-in = the *new* width) and ``b = 0``; then ``W[:o, :i] = W_old``,
    ``b[:o] = b_old``. The old classes' weights on the new extractor's features are therefore random,
    not zero. ``old=None`` gives a fresh layer (PILOT's per-session auxiliary classifier). On ``device``
    (default: ``old``'s, else the CPU)."""
    device = device if device is not None else old.weight.device if old is not None else "cpu"
    layer = nn.utils.skip_init(FP32Linear, in_features, out_features, device=device)  # init below
    with torch.no_grad():
        bound = math.sqrt(3.0 / in_features)  # = kaiming_uniform_(nonlinearity="linear")
        layer.weight.uniform_(-bound, bound)
        layer.bias.zero_()
        if old is not None:
            rows, cols = old.weight.shape
            if rows > out_features or cols > in_features:
                raise ValueError(f"cannot shrink a {rows}x{cols} layer to {out_features}x{in_features}")
            layer.weight[:rows, :cols] = old.weight
            layer.bias[:rows] = old.bias
    return layer


def auxiliary_targets(labels: torch.Tensor, known: int) -> torch.Tensor:
    """The auxiliary classifier's labels: ``y - known + 1`` for the session's classes, 0 for old ones."""
    return torch.where(labels >= known, labels - known + 1, torch.zeros_like(labels))


def auxiliary_loss(aux_logits: torch.Tensor, labels: torch.Tensor, known: int) -> torch.Tensor:
    """``CE(aux_logits, auxiliary_targets(labels, known))``, mean over the batch (PILOT ``loss_aux``)."""
    return F.cross_entropy(aux_logits.float(), auxiliary_targets(labels, known))


@torch.no_grad()
def align_weights(layer: nn.Linear, num_new: int) -> float:
    """Weight aligning (Zhao et al., CVPR 2020; PyCIL's DER/MEMO ``weight_align``, commented out in PILOT):
    the last ``num_new`` rows are scaled by ``gamma = mean_old ||W_c|| / mean_new ||W_c||``. Returns gamma."""
    norms = layer.weight.float().norm(dim=1)
    gamma = norms[:-num_new].mean() / norms[-num_new:].mean()
    layer.weight[-num_new:] *= gamma.to(layer.weight.dtype)
    return float(gamma)


class GrowingClassifier(nn.Module):
    """The classifier over the super-feature and the session's auxiliary classifier (PILOT ``fc``/``aux_fc``).

    ``grow(feature_dim, extractor_dim, total, num_new, device)`` at every session start: ``fc`` becomes
    ``feature_dim -> total`` keeping its old block (:func:`grow_linear`), ``aux`` a fresh
    ``extractor_dim -> num_new + 1`` layer (it exists, unused, in session 0 as in PILOT)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc: FP32Linear | None = None
        self.aux: FP32Linear | None = None

    def grow(self, feature_dim: int, extractor_dim: int, total: int, num_new: int, device: torch.device | str) -> None:
        self.fc = grow_linear(self.fc, feature_dim, total, device)
        self.aux = grow_linear(None, extractor_dim, num_new + 1, device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, total]`` of the super-feature ``features``."""
        if self.fc is None:
            raise RuntimeError("GrowingClassifier.grow was never called")
        return self.fc(features)

    def auxiliary(self, newest: torch.Tensor) -> torch.Tensor:
        """Auxiliary logits ``[B, num_new + 1]`` of the newest extractor's features."""
        if self.aux is None:
            raise RuntimeError("GrowingClassifier.grow was never called")
        return self.aux(newest)
