"""The base of the learners that replay an exemplar memory (LAMDA-PILOT's ``BaseLearner`` with memory:
iCaRL, DER, FOSTER, MEMO, COIL, DGR...).

It declares once what those learners share (LAMDA-PILOT ``models/base.py`` and ``exps/<name>.json``):

* the memory, :class:`~pilot.modules.exemplar_memory.ExemplarMemory` (``memory_size``,
  ``memory_per_class``, ``fixed_memory``; ``memory_selection`` herding or random), updated at the end
  of every session with :meth:`ReplayLearner.exemplar_features` in eval mode (PILOT's
  ``build_rehearsal_memory`` after ``_train``);
* the first session's own training settings, PILOT's ``init_lr``/``init_weight_decay``/
  ``init_milestones``/``init_lr_decay``/``init_epoch`` (``init_optimizer``, ``init_scheduler``,
  ``init_epochs``); later sessions train with the :class:`~pilot.learners.base.Training` settings
  (``lrate``, ``weight_decay``, ``milestones``, ``lrate_decay``, ``epochs``): :meth:`session_training`;
* the replay stream :meth:`replay_batches`: the new classes' training images and the memory's,
  shuffled, train transform (PILOT's ``get_dataset(..., appendent=self._get_memory())``);
* nearest-mean-of-exemplars scores :meth:`predict_nme`, which the run's evaluator reports as
  ``acc_nme`` next to the classifier's ``acc`` (PILOT's ``nme_accy`` beside ``cnn_accy``).

Subclasses declare their own hyperparameters as fields and implement ``predict`` (and training).
:class:`SessionTrainedLearner` (the ``init_*`` settings in :meth:`~SessionTrainedLearner.session_training`,
without a memory) is also the base of Finetune; :class:`LinearHeadLearner` the network of Finetune, iCaRL
and DGR (a trained backbone and one growing linear head). :func:`grown_linear` is PILOT's growing ``SimpleLinear``
head (``IncrementalNet.update_fc``); :func:`kd_loss` its logit distillation (``_KD_loss``).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import MultiStepLR

from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, BatchStream, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.learners.training import OptimizerFactory, SchedulerFactory
from pilot.modules.exemplar_memory import ExemplarMemory, check_memory_fits
from pilot.modules.features import evaluating
from pilot.modules.precision import FP32Linear
from pilot.schema import NonNegativeInt, PositiveInt


def grown_linear(head: nn.Linear | None, in_features: int, total: int, device: torch.device | str) -> FP32Linear:
    """A linear head over ``total`` classes on ``device`` that keeps the rows (and biases) of ``head``; new
    rows are initialised as PILOT's ``SimpleLinear`` (``kaiming_uniform_(nonlinearity="linear")``, bias 0),
    i.e. ``W ~ U(-sqrt(3/d), sqrt(3/d))`` (``IncrementalNet.update_fc``). Computes in float32 under
    autocast (:class:`FP32Linear`)."""
    new = FP32Linear(in_features, total)
    nn.init.kaiming_uniform_(new.weight, nonlinearity="linear")
    nn.init.zeros_(new.bias)
    new = new.to(device)
    if head is not None:
        with torch.no_grad():
            new.weight[: head.out_features] = head.weight
            new.bias[: head.out_features] = head.bias
    return new


def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Knowledge distillation from the previous model (LAMDA-PILOT's ``_KD_loss`` in models/icarl.py,
    der.py, foster.py...; Hinton et al. 2015 without the T^2 factor)::

        L_KD = -(1/B) sum_b sum_c softmax(z_old / T)_bc * log_softmax(z / T)_bc

    ``logits`` ``[B, C]`` (the current model's logits of the C old classes), ``old_logits`` ``[B, C]``;
    computed in float32."""
    log_p = torch.log_softmax(logits.float() / T, dim=1)
    q = torch.softmax(old_logits.float() / T, dim=1)
    return -(q * log_p).sum() / logits.shape[0]


MEMORY_KEYS = ("memory_size", "memory_per_class", "fixed_memory")


class SessionTrainedLearner(Learner):
    """A learner that trains with its own settings in session 0 (PILOT's ``init_*`` keys) and the
    :class:`~pilot.learners.base.Training` settings afterwards (Finetune, and every replay learner)."""

    init_optimizer: OptimizerFactory = partial(SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    init_scheduler: SchedulerFactory | None = partial(MultiStepLR, milestones=[60, 120, 170], gamma=0.1)
    init_epochs: PositiveInt = 20

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.session_index = -1

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.session_index = info.index

    def session_training(self) -> tuple[OptimizerFactory, SchedulerFactory | None, int]:
        """The ``init_*`` settings in session 0, the :class:`~pilot.learners.base.Training` ones afterwards."""
        if self.session_index <= 0:
            return self.init_optimizer, self.init_scheduler, self.init_epochs
        return super().session_training()


class LinearHeadLearner(SessionTrainedLearner):
    """The backbone and one linear head over every seen class, both trained (PILOT's ``IncrementalNet``:
    Finetune, iCaRL, DGR). A replay learner lists :class:`ReplayLearner` first among its bases."""

    head: FP32Linear | None

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.register_module("head", None)

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        device = next(self.backbone.parameters()).device
        self.head = grown_linear(self.head, self.backbone.feature_dim, info.total, device)

    def previous_network(self) -> nn.Module:
        """A frozen copy (eval mode) of the network as it is now: images -> logits (PILOT's old network)."""
        assert self.head is not None
        backbone = copy.deepcopy(self.backbone).requires_grad_(False).eval()
        return nn.Sequential(backbone, copy.deepcopy(self.head).requires_grad_(False))


class ReplayLearner(SessionTrainedLearner):
    """A learner with an exemplar memory: replay batches, memory updates and NME scores."""

    memory_size: NonNegativeInt = 2000
    memory_per_class: NonNegativeInt = 20
    fixed_memory: bool = False
    memory_selection: Literal["herding", "random"] = "herding"

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.memory = ExemplarMemory(self.memory_size, self.memory_per_class, self.fixed_memory, self.memory_selection)
        self._last_features: tuple[Batch, torch.Tensor] | None = None  # predict/predict_nme share one pass

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        super().check_requirements(backbone, scenario, params)
        check_memory_fits(params["memory_size"], params["memory_per_class"], params["fixed_memory"], scenario)

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self._last_features = None

    def end_session(self, session: SessionData) -> None:
        """Update the memory with the trained network (eval mode), as PILOT's ``build_rehearsal_memory``."""
        with evaluating(self):
            self.memory.update(
                self.exemplar_features, session, self.runtime, self.known, self.total, self.eval_batch_size
            )
        self._last_features = None

    # --------------------------------------------------------------------------- training
    def replay_batches(self, session: SessionData, batch_size: int | None = None) -> BatchStream:
        """The new classes' training images followed by the memory's, shuffled, train transform."""
        return session.replay_batches(self.batch_size if batch_size is None else batch_size, self.memory.ids())

    def session_batches(self, session: SessionData) -> BatchStream:
        return self.replay_batches(session)

    # ------------------------------------------------------------------------- inference
    def exemplar_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features herding and NME use (PILOT's ``extract_vector``): the backbone's pooled features.
        Learners with other features (DER's concatenation of every backbone...) override it."""
        return self.backbone(images)

    @torch.inference_mode()
    def eval_features(self, batch: Batch) -> torch.Tensor:
        """:meth:`exemplar_features` of a test batch under the run's autocast; the last batch's are kept,
        so ``predict`` and :meth:`predict_nme` of one batch share one pass."""
        if self._last_features is not None and self._last_features[0] is batch:
            return self._last_features[1]
        with self.runtime.autocast():
            feats = self.runtime.chunked(self.exemplar_features, batch.images)
        self._last_features = (batch, feats)
        return feats

    @torch.inference_mode()
    def predict_nme(self, batch: Batch) -> torch.Tensor | None:
        """Nearest-mean-of-exemplars scores ``[B, total]`` (None before the memory holds every seen class)."""
        if self.memory.class_means.shape[0] != self.total:
            return None
        return self.memory.nme_logits(self.eval_features(batch))
