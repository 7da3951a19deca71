"""COIL (Zhou, Ye, Zhan, "Co-Transport for Class-Incremental Learning", ACM MM 2021) on a pre-trained
backbone, as LAMDA-PILOT runs it (``models/coil.py``, ``SimpleCosineIncrementalNet``, ``exps/coil.json``,
``coil_inr.json``; PyCIL's ``coil.py`` is the authors' code).

Network: the fine-tuned backbone f and a cosine classifier ``sigma cos(f(x), W_c)`` (:class:`CosineLinear`,
sigma learnable). Session 0 trains CE. Session t > 0 trains on the new classes and the memory with

    L = lambda KD(z[:, :K], z_prev, T) + (1 - lambda) CE(z, y) + w_e L_OT          lambda = K / (K + |C_t|)

(KD: :func:`kd_loss`; z_prev from the network as it was at the end of session t-1, frozen), where the
class means ``mu_c = normalise(mean_x normalise(f(x)))`` (training images, test transform) set up two
entropic optimal transports (:func:`~pilot.modules.merging.sinkhorn`, regularisation ``sinkhorn_reg``,
cost ``||mu_i - mu_j||_p`` with p = ``norm_term``, marginals ``1/K`` on every class):

* **prospective** (before training): the plan T ``[K, |C_t|]`` from the old means to the new ones carries
  the old rows to the new classes, ``W_new = gamma K T^T normalise(W_old)`` with gamma matching the
  mean row norms; the new rows start from ``W_new``, and in the first epoch
  ``L_OT = KD(z[:, K:], cos(f(x), W_new), T)``, ``w_0 = prospective_weight`` (PILOT: 0.001);
* **retrospective** (epochs e >= 1, recomputed every ``ot_refresh_every`` batches with the current network,
  old means from the memory): ``W_old' = T'^T normalise(W[K:])`` from the new classes to the old ones, and
  ``L_OT = KD(cos(f(x), W_old'), z_prev, T)``, ``w_e = reg_term (e / epochs)^2``.

PILOT computes the prospective transport at the end of session t-1 with the means of *all* the old classes'
training images (data a replay learner no longer has) and of the next session's images; here it runs when
session t starts (same network), with the old means from the memory (``prospective_old_means="memory"``,
default) or from all their images (``"all_data"``, PILOT). Details that change nothing: PILOT scales
``W_old'`` by K and ``calibration_term`` (then normalised away; the JSON's value is overwritten by gamma
before any use) and adds 1e-8 to the retrospective costs (a constant shift leaves the plan unchanged).
With K != |C_t| the marginals do not have equal mass; POT's Sinkhorn (ours matches it) then runs its 1000
iterations and returns the plan of the rescaled new marginal, with row sums 1/K.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from pilot.data.pipeline import TRAIN, Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import LearnerSetup
from pilot.learners.replay import ReplayLearner, kd_loss
from pilot.learners.training import SchedulerFactory, train_trainable
from pilot.modules.classifiers import CosineLinear
from pilot.modules.exemplar_memory import exemplar_mean, normalise
from pilot.modules.features import extract_features
from pilot.modules.merging import sinkhorn
from pilot.modules.precision import autocast_off, float32_compute
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, PositiveFloat, PositiveInt


@float32_compute
def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos(f, W_c)`` without a scale (COIL's transported classifiers), in float32."""
    return F.linear(F.normalize(features.float(), dim=1), F.normalize(weight.float(), dim=1))


def transport_plan(source: torch.Tensor, target: torch.Tensor, mass: float, p: float, reg: float) -> torch.Tensor:
    """COIL's plan ``[n_source, n_target]`` between class means: cost ``||s_i - t_j||_p``, every marginal
    entry ``mass`` (PILOT: ``1/K`` on both sides), Sinkhorn as POT's ``ot.sinkhorn`` (float64)."""
    cost = torch.cdist(source.double(), target.double(), p=p)
    a = torch.full((len(source),), mass, dtype=torch.float64, device=cost.device)
    b = torch.full((len(target),), mass, dtype=torch.float64, device=cost.device)
    return sinkhorn(a, b, cost, reg)


@register_learner("coil")
class COIL(ReplayLearner):
    """Fine-tuned backbone + cosine classifier; KD, CE and the two optimal-transport terms; NME."""

    T: PositiveFloat = 2.0
    sinkhorn_reg: PositiveFloat = 0.464
    norm_term: PositiveFloat = 3.0
    reg_term: NonNegativeFloat = 1e-3
    prospective_weight: NonNegativeFloat = 1e-3
    ot_refresh_every: PositiveInt = 30
    prospective_old_means: Literal["memory", "all_data"] = "memory"
    init_scheduler: SchedulerFactory | None = partial(MultiStepLR, milestones=[80, 120], gamma=0.1)
    init_epochs: PositiveInt = 10

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.head = CosineLinear(self.backbone.feature_dim)

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        # session 0's rows are drawn (PILOT's fresh CosineLinear); later ones are set by the prospective transport
        self.head.grow(info.total, init="uniform" if self.head.num_classes == 0 else "zeros")

    def train_session(self, session: SessionData) -> None:
        if self.known == 0:
            self.train_epochs(session, lambda b: F.cross_entropy(self.head(self.backbone(b.images)), b.labels))
            return
        previous = self.previous_network()
        prospective = self.prospective_transport(session)
        optimizer, scheduler, epochs = self.session_training()
        batches = self.replay_batches(session)
        position = {"epoch": 0, "step": 0}
        retrospective = prospective  # replaced at the first step of epoch 1

        def epoch_batches(epoch: int) -> Iterable[Batch]:
            position.update(epoch=epoch, step=0)
            return batches

        def loss_fn(batch: Batch) -> torch.Tensor:
            nonlocal retrospective
            epoch, step = position["epoch"], position["step"]
            position["step"] += 1
            if epoch >= 1 and step % self.ot_refresh_every == 0:
                retrospective = self.retrospective_transport(session)
            return self.loss(batch, previous, prospective if epoch < 1 else retrospective, epoch, epochs)

        desc = f"COIL s{session.info.index}"
        train_trainable(self, epoch_batches, epochs, loss_fn, optimizer, self.runtime, scheduler, desc)
        self.zero_grad(set_to_none=True)

    def loss(
        self, batch: Batch, previous: nn.Module, transported: torch.Tensor, epoch: int, epochs: int
    ) -> torch.Tensor:
        """L of one batch in ``epoch``; ``transported``: W_new (epoch 0) or W_old' (later epochs)."""
        terms, lam = self.loss_terms(batch, previous, transported, epoch), self.known / self.total
        if epoch < 1:
            weight = self.prospective_weight * max(1.0 - (epoch / 2) ** 2, 0.0)
        else:
            weight = self.reg_term * (epoch / epochs) ** 2
        return lam * terms["kd"] + (1 - lam) * terms["ce"] + weight * terms["transport"]

    def loss_terms(
        self, batch: Batch, previous: nn.Module, transported: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        """KD, CE and the (unweighted) transport term of one batch: prospective in epoch 0, then retrospective."""
        known, T = self.known, self.T
        feats = self.backbone(batch.images)
        logits = self.head(feats)
        with torch.no_grad():
            old = previous(batch.images)[:, :known]
        if epoch < 1:  # gradients also flow through the target side, as in PILOT
            transport = kd_loss(logits[:, known:], cosine_logits(feats, transported), T)
        else:
            transport = kd_loss(cosine_logits(feats, transported), old, T)
        return {
            "kd": kd_loss(logits[:, :known], old, T),
            "ce": F.cross_entropy(logits, batch.labels),
            "transport": transport,
        }

    def previous_network(self) -> nn.Module:
        """A frozen copy (eval mode) of the network as it is now: images -> logits."""
        backbone = copy.deepcopy(self.backbone).freeze()
        return nn.Sequential(backbone, copy.deepcopy(self.head).requires_grad_(False))

    # --------------------------------------------------------------------------- transports
    def class_means(self, batches: Iterable[Batch], classes: range, desc: str) -> torch.Tensor:
        """``normalise(mean normalise(f(x)))`` of each class of ``classes`` (float64, eval mode, float32 features)."""
        with autocast_off(self.runtime.device):  # also when called from inside the training step's autocast
            feats, labels = extract_features(
                self.backbone, batches, self.runtime, desc=desc, full_precision=True, eval_mode=self.backbone
            )
        feats = normalise(feats.double())
        return torch.stack([exemplar_mean(feats[labels == c]) for c in classes])

    def old_means(self, session: SessionData, source: str) -> torch.Tensor:
        """Means of the old classes from the memory's exemplars or (``all_data``) all their training images."""
        if source == "all_data":
            batches = session.pipeline.batches(TRAIN, range(0, self.known), self.eval_batch_size)
        else:
            batches = session.sample_batches(self.memory.ids(), self.eval_batch_size)
        return self.class_means(batches, range(0, self.known), f"COIL old means s{session.info.index}")

    def new_means(self, session: SessionData) -> torch.Tensor:
        batches = session.prototype_batches(self.eval_batch_size)
        return self.class_means(batches, session.info.new_classes, f"COIL new means s{session.info.index}")

    @torch.no_grad()
    def prospective_transport(self, session: SessionData) -> torch.Tensor:
        """W_new = gamma K T^T normalise(W_old), written into the new rows and returned (PILOT ``solving_ot``)."""
        known = self.known
        plan = transport_plan(
            self.old_means(session, self.prospective_old_means),
            self.new_means(session),
            1.0 / known,
            self.norm_term,
            self.sinkhorn_reg,
        )
        old_rows = self.head.weight[:known].double()
        moved = plan.T @ F.normalize(old_rows, dim=1) * known
        gamma = old_rows.norm(dim=1).mean() / moved.norm(dim=1).mean()
        rows = (moved * gamma).float()
        self.head.assign(session.info.new_classes, rows)
        return rows

    @torch.no_grad()
    def retrospective_transport(self, session: SessionData) -> torch.Tensor:
        """W_old' = T'^T normalise(W[K:]) from the new classes to the old ones (PILOT ``solving_ot_to_old``;
        its factor K x calibration is left out: only the rows' directions are used)."""
        known = self.known
        new_means, old_means = self.new_means(session), self.old_means(session, "memory")
        plan = transport_plan(new_means, old_means, 1.0 / known, self.norm_term, self.sinkhorn_reg)
        return (plan.T @ F.normalize(self.head.weight[known:].double(), dim=1)).float()

    # ------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.head(self.eval_features(batch))
