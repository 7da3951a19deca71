"""SLCA (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", ICCV 2023), as in LAMDA-PILOT ``models/slca.py`` (docs/methods.md §6).

Per session T:

1. Slow learner: the whole backbone trains with a small learning rate (0.01 x 0.01 = 1e-4) and a new
   linear head ``nn.Linear(d, |C_T|)`` (trunc-normal .02, bias 0) with 0.01 (one SGD, two param
   groups, MultiStepLR per epoch); CE on the new head's logits with labels - known. Older heads are
   frozen: no gradient reaches them.
2. Mean and covariance (float64, + 1e-4 I) of the new classes' features (training images, test
   transform, backbone in eval mode and in float32 even in a bf16 run). Old classes keep the
   statistics of their own session.
3. Classifier alignment (T > 0): a copy of all heads is trained on samples of the class Gaussians
   (:mod:`pilot.modules.alignment`), with the means of class c scaled by 0.9 + 0.1 (t_c+1)/(T+1).

Evaluation uses the aligned heads; the next session continues from the stage-1 heads. The
reference backs up the heads after stage 1, aligns them in place and restores the backup after
evaluation; here the stage-1 heads stay in ``self.heads`` and the aligned copy is kept in the
buffers ``aligned_weight``/``aligned_bias`` (all heads concatenated in session order), which
``predict`` uses: the same numbers, and no restore step.

t_c: the reference computes ``c // |C_T|`` (the current session size), wrong for unequal splits
(B50Inc10: class 55 gets t=5 at T=1, scale 1.2). We use the true session of every class;
``reference_session_mapping=true`` reproduces the reference.

Only pooled ``backbone(images)`` features are used, so any backbone works (ViT or CNN). On a CNN,
BatchNorm running statistics stay at their pretrained values while the backbone trains
(``freeze_batchnorm_stats``; the affine weights still train): updated on each session's few
classes, they drift and the stored Gaussians of old classes stop matching their features
(measured on Fashion-MNIST with EfficientNet-Lite0: A_last 54.6 with updating statistics, 80.8 with
fixed ones, SimpleCIL 78.2). ViTs have no BatchNorm. Statistics passes run in eval mode.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.learners.training import OptimizerFactory, SchedulerFactory, slow_backbone_optimizer, train_epochs
from pilot.modules.alignment import align_classifier
from pilot.modules.classifiers import linear_head
from pilot.modules.gaussian import ClassGaussians, zero_rows_to
from pilot.modules.precision import FP32Linear
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


def mean_scale_sessions(scenario: Scenario, info: SessionInfo, reference: bool = False) -> torch.Tensor:
    """t_c for every class seen after session ``info``: its true session, or with ``reference`` the
    reference's ``c // |C_T|`` (current session size)."""
    if reference:
        return torch.arange(info.total) // info.num_new
    return torch.as_tensor(scenario.session_of_label[: info.total], dtype=torch.long)


@register_learner("slca")
class SLCA(Learner):
    """Slow-learning backbone + per-session linear heads + classifier alignment on class Gaussians."""

    requires_vit = False
    aligned_weight: torch.Tensor  # [seen classes, D] buffers: the aligned heads predict uses
    aligned_bias: torch.Tensor

    backbone_lr_scale: NonNegativeFloat = 0.01
    ca_optimizer: OptimizerFactory = partial(SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)
    ca_scheduler: SchedulerFactory | None = partial(CosineAnnealingLR, T_max=3)
    ca_epochs: NonNegativeInt = 3
    ca_samples_per_class: PositiveInt = 256
    ca_batch_size: PositiveInt = 256
    ca_logit_norm: PositiveFloat | None = 0.1
    covariance_shrink: NonNegativeFloat = 1e-4
    reference_session_mapping: bool = False
    freeze_batchnorm_stats: bool = True
    stats_batch_size: PositiveInt = 128

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        if self.backbone_lr_scale == 0:  # the reference's fix_bcb: heads only
            self.backbone.freeze()
        dim = self.backbone.feature_dim
        self.heads = nn.ModuleList()  # stage-1 heads, one per session
        self.stats = ClassGaussians(dim, self.covariance_shrink)
        self.register_buffer("aligned_weight", torch.zeros(0, dim))  # heads used by predict
        self.register_buffer("aligned_bias", torch.zeros(0))

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        device = self.aligned_weight.device
        self.heads.requires_grad_(False)
        self.heads.append(linear_head(self.backbone.feature_dim, info.num_new).to(device))
        self.stats.grow(info.total)
        self.aligned_weight = zero_rows_to(self.aligned_weight, info.total)
        self.aligned_bias = zero_rows_to(self.aligned_bias, info.total)

    def train_session(self, session: SessionData) -> None:
        if self.freeze_batchnorm_stats:
            # BatchNorm layers normalise with their pretrained running statistics and do not update
            # them (their affine weights still train): a CNN's statistics then do not drift to each
            # new session's few classes. ViTs have no BatchNorm; the option changes nothing there.
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        head, known = self.heads[-1], self.known
        optimizer, scheduler = slow_backbone_optimizer(
            self.backbone, head, self.optimizer_factory, self.scheduler, self.backbone_lr_scale
        )

        def loss_fn(batch: Batch) -> torch.Tensor:
            return F.cross_entropy(head(self.backbone(batch.images)), batch.labels - known)

        batches, desc = session.train_batches(self.batch_size), f"SLCA s{session.info.index}"
        train_epochs(batches, self.epochs, loss_fn, optimizer, self.runtime, scheduler, desc)
        self.zero_grad(set_to_none=True)  # free the backbone's gradients before evaluation

    def end_session(self, session: SessionData) -> None:
        info = session.info
        # full_precision: covariances without bf16 rounding noise (modules/precision.py)
        feats, labels = self.class_features(
            session,
            self.backbone,
            self.stats_batch_size,
            "class statistics",
            full_precision=True,
            eval_mode=self.backbone,
        )
        self.stats.update(feats, labels, info.new_classes)

        stage1 = FP32Linear(self.backbone.feature_dim, info.total).to(self.aligned_weight.device)
        with torch.no_grad():
            stage1.weight.copy_(torch.cat([cast(nn.Linear, h).weight for h in self.heads]))
            stage1.bias.copy_(torch.cat([cast(nn.Linear, h).bias for h in self.heads]))
        if info.index > 0 and self.ca_epochs > 0:
            device = self.aligned_weight.device
            align_classifier(
                stage1,
                self.stats,
                blocks=torch.as_tensor(self.scenario.session_of_label[: info.total], device=device),
                scale_sessions=mean_scale_sessions(self.scenario, info, self.reference_session_mapping).to(device),
                current_session=info.index,
                epochs=self.ca_epochs,
                optimizer=self.ca_optimizer,
                scheduler=self.ca_scheduler,
                runtime=self.runtime,
                samples_per_class=self.ca_samples_per_class,
                batch_size=self.ca_batch_size,
                tau=self.ca_logit_norm,
            )
        with torch.no_grad():
            self.aligned_weight.copy_(stage1.weight)
            self.aligned_bias.copy_(stage1.bias)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        # float32 like the statistics pass: the aligned heads were fitted to float32 features
        # (pilot/modules/precision.py; one eval pass per session, a few % of SLCA's time).
        feats = self.runtime.chunked(self.backbone, batch.images)
        return F.linear(feats.float(), self.aligned_weight, self.aligned_bias)
