"""DUCT (Zhou et al., "Dual Consolidation for Pre-Trained Model-Based Domain-Incremental Learning",
CVPR 2025), in LAMDA-PILOT's class-incremental form (``models/duct.py``; official code:
Estrella-fugaz/CVPR25-DUCT).

One cosine classifier ``sigma * cos(f(x), W_c)`` over all classes seen (:class:`CosineLinear`, sigma
learnable). Session t:

1. The backbone restarts from the pre-trained weights theta_0; the class means mu_c of the new
   classes are taken with it (training images, test transform, float64) and kept.
2. Fine-tune backbone (lr 0.1 x ``backbone_lr_scale`` 0.01) and classifier (lr 0.1) with SGD, CE on
   the new classes' logits (labels - known), giving theta_t.
3. Representation consolidation (task arithmetic, :func:`add_task_vector`)::

       theta*_t = theta*_{t-1} + lambda * s_t * (theta_t - theta_0),   theta*_{-1} = theta_0

   lambda = ``merge_scalar`` = 0.25; s_t (``similarity_scaled_merge``, as the reference) is the mean
   over the new classes of cos(mu_c, mu'_c), mu'_c their means under theta_t on *augmented* training
   images; without it s_t = 1 (the official code's last version). theta*_t is evaluated and kept.
4. Classifier retraining on the merged backbone (backbone fixed, ``retrain_epochs`` = 5, same loss).
5. t > 0, classifier consolidation: for every earlier session j, the new rows are carried to session
   j's classes by optimal transport (:func:`transport_classifier`, Sinkhorn with ``ot_reg`` = 0.02 on
   the distances of the theta_0 class means) and mixed in with ratio ``head_merge_ratio`` = 0.25.

Reference details kept: the schedule is ``ConstantLR()`` (lr / 3 for the first 5 epochs, then lr), and
the retraining runs at the *training* lr 0.1 / 3: its parameter group carries ``lrate``, which overrides
the optimiser's ``lr_re`` = 1e-3 (the JSON value never takes effect). Differences, with their switches
(docs: /work/notes/duct_methods.md):

* New classifier rows: the reference grows the classifier with zero rows, whose first cosine gradient
  is scaled by 1/eps = 1e12 (``F.normalize``): one SGD step makes them ~1e10 long, after which they
  hardly move, and the transport then overwrites the old rows with them. ``new_row_init="uniform"``
  (default) draws them as a fresh cosine classifier does, as the official code; ``"zeros"`` = reference
  (the first session's rows are drawn in both).
* Session ranges come from the scenario (the reference uses ``t * increment``, wrong when the first
  session differs in size), with uniform marginals of each session's size.
* LAMDA-PILOT's ``duct.py`` calls ``self._compute_class_mean``, which its ``BaseLearner`` does not
  define (the official ``BaseLearner`` does): the reference does not run as shipped.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ConstantLR

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.learners.training import OptimizerFactory, ParamGroups, SchedulerFactory, build_optimizer, train_epochs
from pilot.modules.classifiers import CosineLinear, class_means
from pilot.modules.features import evaluating, extract_features
from pilot.modules.merging import add_task_vector, flatten, floating_state, transport_classifier, unflatten_
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, PositiveFloat, PositiveInt, Probability


@register_learner("duct")
class DUCT(Learner):
    """Per-session fine-tuning from the pre-trained model, task-vector merging, transported classifier."""

    requires_vit = False
    pretrained: torch.Tensor  # theta_0: the backbone's floating state, flattened (rebuilt, not checkpointed)
    means: torch.Tensor  # [seen, D] float64 class means under theta_0

    backbone_lr_scale: NonNegativeFloat = 0.01
    merge_scalar: NonNegativeFloat = 0.25
    similarity_scaled_merge: bool = True
    retrain_optimizer: OptimizerFactory = partial(SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
    retrain_scheduler: SchedulerFactory | None = partial(ConstantLR, factor=1 / 3, total_iters=5)
    retrain_epochs: PositiveInt = 5
    head_merge_ratio: Probability = 0.25
    ot_reg: PositiveFloat = 0.02
    new_row_init: Literal["uniform", "zeros"] = "uniform"
    stats_batch_size: PositiveInt = 128

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        if self.backbone_lr_scale == 0:
            self.backbone.freeze()
        self.head = CosineLinear(self.backbone.feature_dim)
        self.register_buffer("pretrained", flatten(floating_state(self.backbone)), persistent=False)
        self.register_buffer("means", torch.zeros(0, self.backbone.feature_dim, dtype=torch.float64))
        self.merged: torch.Tensor | None = None  # theta*_{t-1} while session t trains

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        # the first session's rows start as a fresh cosine classifier's in both variants (the reference too)
        self.head.grow(info.total, init="uniform" if self.head.num_classes == 0 else self.new_row_init)
        self.means = torch.cat(
            [self.means, self.means.new_zeros(info.total - self.means.shape[0], self.means.shape[1])]
        )

    def train_session(self, session: SessionData) -> None:
        state = floating_state(self.backbone)
        self.merged = flatten(state)
        unflatten_(self.pretrained, state)  # every session fine-tunes theta_0
        feats, labels = self.features(session.prototype_batches(self.stats_batch_size), "theta_0 class means")
        self.means[self.known :] = class_means(feats, labels, session.info.new_classes).double()
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters())}]
        if backbone_params:
            groups.insert(0, {"params": backbone_params})

        def scaled(groups: ParamGroups) -> Optimizer:  # backbone lr scaled before the scheduler records it
            opt = self.optimizer_factory(groups)
            if backbone_params:
                opt.param_groups[0]["lr"] *= self.backbone_lr_scale
            return opt

        optimizer, scheduler = build_optimizer(groups, scaled, self.scheduler)
        batches, desc = session.train_batches(self.batch_size), f"DUCT s{session.info.index}"
        train_epochs(
            batches,
            self.epochs,
            lambda b: self.new_class_loss(b, self.backbone(b.images)),
            optimizer,
            self.runtime,
            scheduler,
            desc,
        )
        self.zero_grad(set_to_none=True)

    def end_session(self, session: SessionData) -> None:
        self.merge_backbone(session)
        self.retrain_classifier(session)
        if session.info.index > 0:
            self.consolidate_classifier(session.info)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            return self.head(self.runtime.chunked(self.backbone, batch.images))

    # ------------------------------------------------------------------------ mechanisms
    def merge_backbone(self, session: SessionData) -> None:
        """theta*_t = theta*_{t-1} + lambda s_t (theta_t - theta_0), written into the backbone."""
        scale = self.merge_scalar * self.similarity(session) if self.similarity_scaled_merge else self.merge_scalar
        state = floating_state(self.backbone)
        if self.merged is None:
            raise RuntimeError("DUCT.merge_backbone needs the merged backbone kept by train_session")
        unflatten_(add_task_vector(self.merged, flatten(state), self.pretrained, scale), state)
        self.merged = None

    def retrain_classifier(self, session: SessionData) -> None:
        """The classifier trains again on the merged backbone, which stays fixed (BatchNorm statistics too)."""

        def loss_fn(batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                feats = self.backbone(batch.images)
            return self.new_class_loss(batch, feats)

        with evaluating(self.backbone):
            optimizer, scheduler = build_optimizer(self.head, self.retrain_optimizer, self.retrain_scheduler)
            batches, desc = session.train_batches(self.batch_size), f"DUCT retrain s{session.info.index}"
            train_epochs(batches, self.retrain_epochs, loss_fn, optimizer, self.runtime, scheduler, desc)
        self.zero_grad(set_to_none=True)

    def new_class_loss(self, batch: Batch, feats: torch.Tensor) -> torch.Tensor:
        """CE over the new classes' logits only (labels - known), as the reference trains and retrains."""
        return F.cross_entropy(self.head(feats)[:, self.known :], batch.labels - self.known)

    def features(self, batches: Iterable[Batch], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features in float32 with the backbone in eval mode (the reference's ``_extract_vectors``)."""
        return extract_features(
            self.backbone, batches, self.runtime, desc=desc, full_precision=True, eval_mode=self.backbone
        )

    def similarity(self, session: SessionData) -> float:
        """s_t: mean over the new classes of cos(mu_c under theta_0, mu_c under theta_t on augmented images)."""
        batches = session.train_batches(self.stats_batch_size, augment=True, shuffle=False)
        feats, labels = self.features(batches, "theta_t class means")
        tuned = class_means(feats, labels, session.info.new_classes).double()
        return float(F.cosine_similarity(self.means[self.known :], tuned, dim=1).mean())

    @torch.no_grad()
    def consolidate_classifier(self, info: SessionInfo) -> None:
        """Old rows <- (1 - r) old + r T^T new for every earlier session (new rows after retraining)."""
        weight, new = self.head.weight, slice(info.known, info.total)
        for earlier in self.scenario.sessions[: info.index]:
            old = slice(earlier.known, earlier.total)
            weight[old], _ = transport_classifier(
                weight[old], weight[new], self.means[old], self.means[new], self.head_merge_ratio, self.ot_reg
            )
