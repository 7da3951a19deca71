"""FOSTER (Wang, Zhou, Ye, Zhan, "FOSTER: Feature Boosting and Compression for Class-Incremental Learning",
ECCV 2022) on a pre-trained backbone, as LAMDA-PILOT runs it (``models/foster.py``, ``utils/inc_net.py``
``FOSTERNet``, ``exps/foster.json``, ``foster_inr.json``; the official code G-U-N/ECCV22-FOSTER is the same).

Session 0 fine-tunes the backbone f and a linear head ``W_s`` (CE, the ``init_*`` settings). Session t > 0:

1. **Boosting.** A teacher holds the previous model f_old (frozen, eval mode), a copy f_new of it, a head
   ``W`` over ``phi = [f_old; f_new]`` (old block = the previous head, the rest drawn as PILOT's
   ``SimpleLinear``), a head ``W_fe`` over f_new and the previous head ``W_old`` (frozen). Trained on the
   session's images and the memory (``epochs``, ``optimizer``)::

       L_boost = CE(W phi / w1, y) + CE(W_fe f_new, y) + lambda_okd KD(W phi [:, :K], W_old f_old, T)

   ``w_c = (1 - beta) / (1 - beta^n_c)`` summing to the number of classes (:func:`class_balanced_weights`,
   w1: beta1; n_c: the per-class memory size for old classes, the images of new ones); KD is
   :func:`kd_loss` (no T^2). ``oofc="az"`` keeps the new classes' weights on f_old at 0. Optionally the
   teacher's new rows are weight-aligned (``teacher_weight_align``).
2. **Compression.** The student (f = the previous model; ``W_s`` keeps the old rows, new rows drawn) learns
   from the teacher (eval mode) by :func:`balanced_kd_loss` (w2: beta2) with ``compression_optimizer`` (no
   weight decay) for ``compression_epochs``; optional weight aligning.

The student starts the next session. PILOT (and the official code) evaluate the *teacher* (two backbones)
and build the memory and NME means on its features; the student only shows in a log line.
``evaluate_with="student"`` evaluates the compressed model instead (memory on its features). The teacher
is rebuilt every session and left out of checkpoints. Memory: three ViT-B/16 copies in a session (as PILOT).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import TRAIN, Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.base import LearnerSetup
from pilot.learners.replay import ReplayLearner, grown_linear, kd_loss
from pilot.learners.training import OptimizerFactory, SchedulerFactory, train_trainable
from pilot.modules.features import evaluating
from pilot.modules.growing import align_weights, concat_features, grow_linear
from pilot.modules.precision import FP32Linear, float32_compute
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, Probability


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """``w_c = (1 - beta) / (1 - beta^n_c)``, rescaled so that ``sum_c w_c = C`` (effective number of samples,
    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019; PILOT per_cls_weights)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - beta**n)
    return (weights / weights.sum() * len(n)).float()


@float32_compute
def balanced_kd_loss(logits: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, T: float) -> torch.Tensor:
    """FOSTER's compression loss (PILOT ``BKD``), KD towards the teacher's softened outputs reweighted per class:
    ``q = normalise_c(softmax(z_t / T) * w)``, ``L = -(1/B) sum_b sum_c q_bc log_softmax(z / T)_bc``."""
    q = torch.softmax(teacher.float() / T, dim=1) * weights.to(logits.device)
    q = q / q.sum(dim=1, keepdim=True)
    return -(q * torch.log_softmax(logits.float() / T, dim=1)).sum() / logits.shape[0]


class BoostedTeacher(nn.Module):
    """FOSTER's boosted network of one session (PILOT ``FOSTERNet`` with two backbones): f_old (frozen copy),
    f_new (trainable copy), ``fc`` over ``[f_old; f_new]``, ``fe_fc`` over f_new, ``old_fc`` (frozen)."""

    def __init__(self, backbone: Backbone, head: nn.Linear, known: int, total: int) -> None:
        super().__init__()
        dim, device = backbone.feature_dim, head.weight.device
        self.old_backbone = copy.deepcopy(backbone).freeze()  # eval mode for good
        self.new_backbone = copy.deepcopy(backbone)
        self.old_fc = FP32Linear(dim, known).to(device).requires_grad_(False)
        with torch.no_grad():
            self.old_fc.weight.copy_(head.weight[:known])
            self.old_fc.bias.copy_(head.bias[:known])
        self.fc = grow_linear(self.old_fc, 2 * dim, total, device)
        self.fe_fc = grow_linear(None, dim, total, device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return concat_features([self.old_backbone(images), self.new_backbone(images)])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits over ``phi``, logits of ``fe_fc`` on f_new, previous head's logits on f_old)."""
        feats = self.features(images)
        dim = feats.shape[1] // 2
        return self.fc(feats), self.fe_fc(feats[:, dim:]), self.old_fc(feats[:, :dim])


@register_learner("foster")
class FOSTER(ReplayLearner):
    """Feature boosting with a second backbone, then compression into a single student by balanced KD."""

    head: FP32Linear | None
    teacher: BoostedTeacher | None

    beta1: Probability = 0.96
    beta2: Probability = 0.97
    oofc: Literal["ft", "az"] = "ft"
    lambda_okd: NonNegativeFloat = 1.0
    T: PositiveFloat = 2.0
    teacher_weight_align: bool = False
    student_weight_align: bool = False
    wa_value: PositiveFloat = 1.0
    compression_optimizer: OptimizerFactory = partial(SGD, lr=1e-3, momentum=0.9)
    compression_scheduler: SchedulerFactory | None = partial(CosineAnnealingLR, T_max=20)
    compression_epochs: NonNegativeInt = 20
    evaluate_with: Literal["teacher", "student"] = "teacher"
    fixed_memory: bool = True
    init_scheduler: SchedulerFactory | None = partial(CosineAnnealingLR, T_max=20)

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.register_module("head", None)  # the student's head W_s (session 0: the only head)
        self.register_module("teacher", None)

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        super().check_requirements(backbone, scenario, params)
        for key in ("beta1", "beta2"):
            if params[key] >= 1:
                raise ConfigError(f"method.{key}={params[key]} must be < 1: the class weights divide by 1 - {key}^n.")

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.teacher = None  # the previous session's teacher is dropped; the student continues
        self.head = grown_linear(self.head, self.backbone.feature_dim, info.total, self.memory.ids_buffer.device)

    def train_session(self, session: SessionData) -> None:
        head = self.head
        assert head is not None
        if self.known == 0:
            self.train_epochs(session, lambda b: F.cross_entropy(head(self.backbone(b.images)), b.labels))
            return
        self.teacher = BoostedTeacher(self.backbone, head, self.known, self.total)
        counts = self.class_counts(session)
        self.boost(session, class_balanced_weights(counts, self.beta1).to(head.weight.device))
        self.compress(session, class_balanced_weights(counts, self.beta2).to(head.weight.device))

    def class_counts(self, session: SessionData) -> list[int]:
        """n_c: the per-class memory size for old classes (PILOT ``samples_old_class``), images of new ones."""
        indices = session.pipeline.indices
        return [self.memory.per_class(self.known)] * self.known + [
            len(indices(TRAIN, range(c, c + 1))) for c in session.info.new_classes
        ]

    # ------------------------------------------------------------------------ the two stages
    def boosting_losses(self, batch: Batch, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms of L_boost on one batch (``weights``: w1)."""
        assert self.teacher is not None
        logits, fe_logits, old_logits = self.teacher(batch.images)
        return {
            "clf": F.cross_entropy(logits / weights, batch.labels),
            "fe": F.cross_entropy(fe_logits, batch.labels),
            "kd": self.lambda_okd * kd_loss(logits[:, : self.known], old_logits.detach(), self.T),
        }

    def boost(self, session: SessionData, weights: torch.Tensor) -> None:
        teacher, known, dim = self.teacher, self.known, self.backbone.feature_dim
        assert teacher is not None
        hook = None
        if self.oofc == "az":  # new classes' weights on the old features stay 0 (their gradient is zeroed)
            mask = torch.ones_like(teacher.fc.weight)
            mask[known:, :dim] = 0
            with torch.no_grad():
                teacher.fc.weight.mul_(mask)
            hook = teacher.fc.weight.register_hook(lambda grad: grad * mask)

        def loss_fn(batch: Batch) -> torch.Tensor:
            losses = self.boosting_losses(batch, weights)
            return losses["clf"] + losses["fe"] + losses["kd"]

        self.train_epochs(session, loss_fn, params=teacher)
        if hook is not None:
            hook.remove()
        teacher.requires_grad_(False)
        if self.teacher_weight_align:
            self.align(teacher.fc)

    def compression_loss(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        """Balanced KD from the teacher's logits to the student's on one batch (``weights``: w2)."""
        assert self.teacher is not None and self.head is not None
        with torch.no_grad():
            target = self.teacher(batch.images)[0]
        return balanced_kd_loss(self.head(self.backbone(batch.images)), target, weights, self.T)

    def compress(self, session: SessionData, weights: torch.Tensor) -> None:
        assert self.teacher is not None and self.head is not None
        with evaluating(self.teacher):
            train_trainable(
                [*self.backbone.parameters(), *self.head.parameters()],
                self.replay_batches(session),
                self.compression_epochs,
                lambda b: self.compression_loss(b, weights),
                self.compression_optimizer,
                self.runtime,
                self.compression_scheduler,
                f"FOSTER compression s{session.info.index}",
            )
        self.zero_grad(set_to_none=True)
        if self.student_weight_align:
            self.align(self.head)

    @torch.no_grad()
    def align(self, layer: nn.Linear) -> None:
        """PILOT ``weight_align``: new rows x ``mean_old ||W_c|| / mean_new ||W_c|| * wa_value^(K / |C_t|)``."""
        num_new = self.total - self.known
        align_weights(layer, num_new)
        layer.weight[-num_new:] *= self.wa_value ** (self.known / num_new)

    # ------------------------------------------------------------------------- inference
    def evaluated_teacher(self) -> BoostedTeacher | None:
        """The teacher when it is the evaluated model (after session 0, unless ``evaluate_with="student"``)."""
        return self.teacher if self.evaluate_with == "teacher" else None

    def exemplar_features(self, images: torch.Tensor) -> torch.Tensor:
        """Herding and NME features: the teacher's ``[f_old; f_new]`` (PILOT) or the student's f."""
        teacher = self.evaluated_teacher()
        return teacher.features(images) if teacher is not None else self.backbone(images)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        teacher, head = self.evaluated_teacher(), self.head
        assert head is not None
        return (teacher.fc if teacher is not None else head)(self.eval_features(batch))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Without the teacher: the next session starts from the student, and builds its own teacher."""
        state = super().state_dict(*args, **kwargs)
        skip = kwargs.get("prefix", "") + "teacher."
        return type(state)((k, v) for k, v in state.items() if not k.startswith(skip))
