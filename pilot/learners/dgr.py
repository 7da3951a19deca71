"""DGR (He & Zhu, "Gradient Reweighting: Towards Imbalanced Class-Incremental Learning", CVPR 2024) on a
pre-trained backbone, as LAMDA-PILOT ``models/dgr.py`` runs it (exps/dgr.json, dgr_inr.json; the file is
the authors' own ViT code, github.com/JiangpengHe/imbalanced_cil commit 2607652).

Network: PILOT's ``IncrementalNet``, the whole backbone fine-tuned and a linear head grown by the
session's classes (:func:`~pilot.learners.replay.grown_linear`), trained on the new classes' images
plus the exemplar memory (:class:`~pilot.learners.replay.ReplayLearner`). With ``n_c`` the images of
class c in the session's training set, ``K`` old and ``N`` seen classes, ``z`` the head's logits:

    L_ce = CE(z + log pi, y),  pi_c = n_c / sum_k n_k          (prior-regularised softmax)
    L    = L_ce + lambda * K / (N - K) * L_KD(z[:, :K], z_prev, T)     (L_KD only when K > 0)

The backbone gets the gradient of ``L``. The head's gradient is rebuilt per step from the per-class
rows of ``g_ce = dL_ce/dW`` and ``g_kd = dL_KD/dW`` (weight rows and bias alike), with
``Phi_c = sum over the session's steps so far of ||g_ce_c||``:

    session 0:  alpha_c = min_k Phi_k / Phi_c,                    grad_c = alpha_c g_ce_c
    later:      alpha_c = min_{k in S} Phi_k / Phi_c for c in S = old or new classes,
                r = mean_new Phi / mean_old Phi,
                alpha_old *= min(1, r),  alpha_new *= min(1, r exp(-gamma_r K / N))
                beta = || alpha * ||g_ce|| || / || ||g_kd|| ||      (norms of the per-class norms, this step)
                grad_c = alpha_c g_ce_c + beta g_kd_c (old c),   alpha_c g_ce_c (new c)

so the head's distillation gradient always has the norm of its reweighted CE gradient.
``distillation``: ``kd`` (PILOT's, :func:`~pilot.learners.replay.kd_loss`) or ``dakd`` (the paper's
distribution-aware KD, :func:`~pilot.modules.distillation.dakd_loss`, on the old classes' lost images;
equal to ``kd`` when every old class lost as many images). When the current and previous logits are
equal (the first step of a session on a ViT) ``g_kd`` is rounding noise: PILOT scales it to the CE
gradient's norm, here beta = 0. Inference: the head's logits (``acc``) and NME (``acc_nme``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from pilot import distributed
from pilot.data.pipeline import TRAIN, Batch, SessionData
from pilot.learners.base import LearnerSetup
from pilot.learners.replay import LinearHeadLearner, ReplayLearner, kd_loss
from pilot.learners.training import Batches, OptimizerFactory, SchedulerFactory, train_trainable
from pilot.modules.distillation import dakd_loss, logit_adjusted_cross_entropy
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, PositiveFloat


def class_balance_weights(accumulated: torch.Tensor, known: int, gamma_r: float) -> torch.Tensor:
    """alpha from the accumulated per-class CE gradient norms ``Phi`` ``[N]`` (see the module docstring)."""
    if known == 0:
        return accumulated.min() / accumulated
    old, new = accumulated[:known], accumulated[known:]
    ratio = new.mean() / old.mean()
    attenuation = math.exp(-gamma_r * known / len(accumulated))
    return torch.cat([old.min() / old * ratio.clamp(max=1.0), new.min() / new * (ratio * attenuation).clamp(max=1.0)])


def distillation_scale(alpha: torch.Tensor, ce_norms: torch.Tensor, kd_norms: torch.Tensor) -> torch.Tensor:
    """beta = ||alpha * ||g_ce_c|| || / || ||g_kd_c|| ||, 0 where the distillation gradient is 0."""
    kd = kd_norms.norm()
    return torch.where(kd > 0, (alpha * ce_norms).norm() / kd.clamp_min(torch.finfo(kd.dtype).tiny), 0.0)


def global_gradients(grads: list[torch.Tensor], batch: Any) -> list[torch.Tensor]:
    """The global batch's gradients in a data-parallel run (``sum_r share_r g_r``); ``grads`` otherwise."""
    if not (distributed.active() and isinstance(batch, Batch)):
        return grads
    flat = torch.cat([g.reshape(-1).float() for g in grads]) * batch.share
    distributed.all_reduce_sum(flat)
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]


@register_learner("dgr")
class DGR(ReplayLearner, LinearHeadLearner):
    """Fine-tuned backbone + growing linear head; prior-regularised CE + KD with reweighted head gradients."""

    T: PositiveFloat = 2.0
    kd_lambda: NonNegativeFloat = 1.0
    gamma_r: NonNegativeFloat = 1.0
    distillation: Literal["kd", "dakd"] = "kd"
    init_scheduler: SchedulerFactory | None = partial(CosineAnnealingLR, T_max=20)

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)

    # --------------------------------------------------------------------------- training
    def train_session(self, session: SessionData) -> None:
        """Count the images of each class in the training set (new data + memory), then train."""
        pipeline, known = session.pipeline, self.known
        labels = pipeline.labels(TRAIN)
        ids = np.concatenate([pipeline.indices(TRAIN, session.info.new_classes), self.memory.ids()])
        counts = torch.as_tensor(np.bincount(labels[ids], minlength=self.total), dtype=torch.float64)
        lost = None
        if known and self.distillation == "dakd":
            original = torch.tensor([len(pipeline.indices(TRAIN, range(c, c + 1))) for c in range(known)])
            lost = original.double() - counts[:known]
        optimizer, scheduler, epochs = self.session_training()
        desc = f"DGR s{session.info.index}"
        self.train_reweighted(self.replay_batches(session), counts, lost, optimizer, scheduler, epochs, desc)

    def train_reweighted(
        self,
        batches: Batches,
        class_counts: torch.Tensor,
        lost_counts: torch.Tensor | None,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        epochs: int,
        desc: str = "DGR",
    ) -> list[float]:
        """The session's training loop: the shared epoch loop with a loss whose head gradient is DGR's.

        ``class_counts`` ``[N]``: images per class in the training set (prior); ``lost_counts`` ``[K]``:
        the old classes' images not in the memory (``distillation="dakd"`` only)."""
        known, total, head = self.known, self.total, self.head
        assert head is not None
        previous = self.previous_network() if known > 0 else None
        kd_weight = self.kd_lambda * known / max(total - known, 1)
        accumulated = torch.zeros(total, dtype=torch.float64, device=head.weight.device)
        params = [head.weight, head.bias]

        def loss_fn(batch: Batch) -> torch.Tensor:
            nonlocal accumulated
            logits = head(self.backbone(batch.images))
            ce = logit_adjusted_cross_entropy(logits, batch.labels, class_counts)
            own = list(torch.autograd.grad(ce, params, retain_graph=True))  # this rank's head gradient of `loss`
            g_ce = global_gradients(own, batch)
            ce_norms = g_ce[0].norm(dim=1).double()
            accumulated = accumulated + ce_norms
            alpha = class_balance_weights(accumulated, known, self.gamma_r)
            target = [alpha.to(g.dtype).view(-1, *[1] * (g.dim() - 1)) * g for g in g_ce]
            loss = ce
            if previous is not None:
                with torch.no_grad():
                    old = previous(batch.images)[:, :known].float()
                kd = self.distill(logits[:, :known], old, lost_counts)
                loss = ce + kd_weight * kd
                own_kd = list(torch.autograd.grad(kd, params, retain_graph=True))
                g_kd = global_gradients(own_kd, batch)
                beta = distillation_scale(alpha, ce_norms, g_kd[0][:known].norm(dim=1).double())
                beta = torch.where((logits[:, :known].detach() == old).all(), 0.0, beta).float()
                target = [t + beta * g for t, g in zip(target, g_kd)]
                own = [c + kd_weight * g for c, g in zip(own, own_kd)]
            # The returned value is `loss`; its gradient is the backbone's of `loss` and, on the head,
            # `target` in place of `own` (the head's gradient of `loss`).
            swap = sum(((p * (t - o).detach()).sum() for p, t, o in zip(params, target, own)), head.bias.new_zeros(()))
            return loss + (swap - swap.detach())

        losses = train_trainable(self, batches, epochs, loss_fn, optimizer, self.runtime, scheduler, desc)
        self.zero_grad(set_to_none=True)  # free the gradients before evaluation
        return losses

    def distill(self, logits: torch.Tensor, old: torch.Tensor, lost_counts: torch.Tensor | None) -> torch.Tensor:
        if self.distillation == "dakd":
            assert lost_counts is not None
            return dakd_loss(logits, old, lost_counts, self.T)
        return kd_loss(logits, old, self.T)

    # ------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        assert self.head is not None
        return self.head(self.eval_features(batch))
