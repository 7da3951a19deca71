"""CoFiMA (Marouf et al., "Weighted Ensemble Models Are Strong Continual Learners", ECCV 2024), as in
LAMDA-PILOT ``models/cofima.py`` (official code: IemProg/CoFiMA).

SLCA (:mod:`pilot.learners.slca`, docs/methods.md §6) with a weight-space merge after every session.
Session t:

1. Slow learner, as SLCA: the backbone (lr 1e-4) and a new linear head (lr 1e-2) train on the new
   classes; the result is theta_t (backbone and stage-1 heads).
2. Diagonal Fisher F_t of every backbone parameter and of every head (:func:`diagonal_fisher`): one pass
   over the session's training batches (training transform, batch ``batch_size``), the squared
   gradient of each batch's cross-entropy over *all* seen classes (labels as they are), averaged over
   the batches and clipped at ``fisher_max`` = 1e-4.
3. t > 0: merge with theta*_{t-1} (the backbone evaluated after session t-1 and the aligned heads of
   session t-1), alpha = ``merge_weight`` = 0.4 (``wt_lambda``)::

       theta*_t = ((1 - a) F_{t-1} theta*_{t-1} + a F_t theta_t) / ((1 - a) F_{t-1} + a F_t)

   (``fisher_weighting=false``: CoMA, ``(1 - a) theta*_{t-1} + a theta_t``). The merged backbone is
   kept: it is evaluated and the next session trains from it. The new head is not in theta*_{t-1}: it
   keeps ``theta_t``'s rows (as the reference's branch without Fisher weighting does).
4. Class statistics of the new classes on the merged backbone, and classifier alignment starting
   from the merged heads (SLCA's stage 2). Evaluation uses the aligned heads; the next session trains
   from the stage-1 heads (the reference restores its head backup after evaluation).

Differences from the reference (docs: /work/notes/cofima_methods.md):

* The reference's Fisher branch sets the new head to ``F_t * theta_t`` (a product, not a merge: rows
  shrink to <= 1e-4 of their size) and alignment must regrow it; on EfficientNet-Lite0 / Fashion-MNIST
  (quickstart, 2 epochs) this sent every old-class test image to the new classes after session 1
  (old 0.0 %, vs 69.5 % keeping theta_t). ``scale_new_head_by_fisher=true`` reproduces the reference.
* Old heads' Fisher. The reference's heads of earlier sessions are frozen during the Fisher pass, so
  ``p.grad`` still holds the gradient of their last backward (the last classifier-alignment step, or
  session 0's last Fisher batch) and that stale value is squared into F_t. Here every head gets the
  gradient of the Fisher loss itself (the Fisher of the model as a whole).
* Where F_{t-1} = F_t = 0 the formula is 0/0 (NaN in the reference, e.g. with a frozen backbone);
  we take the plain interpolation (:func:`fisher_weighted_average`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, cast

import torch
import torch.nn.functional as F
from torch import nn

from pilot.data.pipeline import SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import LearnerSetup
from pilot.learners.slca import SLCA
from pilot.modules.merging import diagonal_fisher, fisher_weighted_average, flatten, interpolate, unflatten_
from pilot.registry import register_learner
from pilot.schema import PositiveFloat, Probability


@register_learner("cofima")
class CoFiMA(SLCA):
    """SLCA whose backbone and heads are Fisher-weighted averages of the previous and the current session's."""

    fisher_backbone: torch.Tensor  # F_{t-1} of the trainable backbone parameters, flattened in their order
    fisher_head_weight: torch.Tensor  # F_{t-1} of the stage-1 heads' rows [seen, D] and biases [seen]
    fisher_head_bias: torch.Tensor

    merge_weight: Probability = 0.4
    fisher_weighting: bool = True
    fisher_max: PositiveFloat = 1e-4
    scale_new_head_by_fisher: bool = False

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        size = sum(p.numel() for p in self.merged_parameters()) if self.fisher_weighting else 0
        self.register_buffer("fisher_backbone", torch.zeros(size))
        self.register_buffer("fisher_head_weight", torch.zeros(0, self.backbone.feature_dim))
        self.register_buffer("fisher_head_bias", torch.zeros(0))
        self.previous: torch.Tensor | None = None  # theta*_{t-1} of the backbone during session t

    def merged_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters that train, hence are merged (none with ``backbone_lr_scale=0``)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        extra = info.total - self.fisher_head_weight.shape[0]
        zeros = self.fisher_head_weight.new_zeros(extra, self.backbone.feature_dim)
        self.fisher_head_weight = torch.cat([self.fisher_head_weight, zeros])
        self.fisher_head_bias = torch.cat([self.fisher_head_bias, self.fisher_head_bias.new_zeros(extra)])

    def train_session(self, session: SessionData) -> None:
        if session.info.index > 0:  # the backbone this session starts from: merged and evaluated last session
            self.previous = flatten(self.merged_parameters())
        super().train_session(session)

    def end_session(self, session: SessionData) -> None:
        info, known = session.info, session.info.known
        heads = [cast(nn.Linear, h) for h in self.heads]
        weight = torch.cat([h.weight for h in heads]).detach().clone()  # stage-1 heads of theta_t
        bias = torch.cat([h.bias for h in heads]).detach().clone()
        params = self.merged_parameters()
        fisher_backbone, fisher_weight, fisher_bias = self.fisher(session, params, heads)
        init_weight, init_bias = weight, bias
        if info.index > 0:
            if params and self.previous is not None:
                merged = self.merge(self.previous, flatten(params), self.fisher_backbone, fisher_backbone)
                unflatten_(merged, params)
            old = slice(0, known)
            init_weight = torch.cat(
                [
                    self.merge(self.aligned_weight[old], weight[old], self.fisher_head_weight[old], fisher_weight[old]),
                    self.new_head_rows(weight[known:], fisher_weight[known:]),
                ]
            )
            init_bias = torch.cat(
                [
                    self.merge(self.aligned_bias[old], bias[old], self.fisher_head_bias[old], fisher_bias[old]),
                    self.new_head_rows(bias[known:], fisher_bias[known:]),
                ]
            )
        self.previous = None
        if self.fisher_weighting:
            self.fisher_backbone.copy_(fisher_backbone)
            self.fisher_head_weight.copy_(fisher_weight)
            self.fisher_head_bias.copy_(fisher_bias)
        with self.heads_holding(heads, init_weight, init_bias):
            super().end_session(session)  # statistics on the merged backbone, alignment from the merged heads

    # ------------------------------------------------------------------------ the merge
    def merge(
        self, old: torch.Tensor, new: torch.Tensor, fisher_old: torch.Tensor, fisher_new: torch.Tensor
    ) -> torch.Tensor:
        if not self.fisher_weighting:
            return interpolate(old, new, self.merge_weight)
        return fisher_weighted_average(old, new, fisher_old, fisher_new, self.merge_weight)

    def new_head_rows(self, rows: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
        """The new head after the merge: ``F_t * theta_t`` (reference) or ``theta_t``."""
        return rows * fisher if self.fisher_weighting and self.scale_new_head_by_fisher else rows

    def fisher(
        self, session: SessionData, params: list[nn.Parameter], heads: list[nn.Linear]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """F_t of ``params`` (flattened) and of the heads' rows and biases (concatenated in session order);
        zeros without ``fisher_weighting``."""
        head_params = [t for h in heads for t in (h.weight, h.bias)]
        if not self.fisher_weighting:
            zeros = [torch.zeros_like(t) for t in head_params]
            return self.fisher_backbone, torch.cat(zeros[0::2]), torch.cat(zeros[1::2])
        flags = [t.requires_grad for t in head_params]

        def losses() -> Iterator[torch.Tensor]:
            for batch in session.train_batches(self.batch_size):
                with self.runtime.autocast():
                    feats = self.backbone(batch.images)
                    loss = F.cross_entropy(torch.cat([h(feats) for h in heads], dim=1), batch.labels)
                yield loss

        try:
            for t in head_params:
                t.requires_grad_(True)  # old heads too: their Fisher under the loss over all seen classes
            fisher = diagonal_fisher(params + head_params, losses(), self.fisher_max)
        finally:
            for t, flag in zip(head_params, flags):
                t.requires_grad_(flag)
        tail = fisher[len(params) :]
        backbone = flatten(fisher[: len(params)]) if params else self.fisher_backbone.new_zeros(0)
        return backbone, torch.cat(tail[0::2]), torch.cat(tail[1::2])

    @contextlib.contextmanager
    def heads_holding(self, heads: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor) -> Iterator[None]:
        """The heads hold ``weight``/``bias`` (rows in session order) inside the block, their own values after it."""
        saved = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in heads]
        with torch.no_grad():
            start = 0
            for h in heads:
                h.weight.copy_(weight[start : start + h.out_features])
                h.bias.copy_(bias[start : start + h.out_features])
                start += h.out_features
        try:
            yield
        finally:
            with torch.no_grad():
                for h, (w, b) in zip(heads, saved):
                    h.weight.copy_(w)
                    h.bias.copy_(b)
