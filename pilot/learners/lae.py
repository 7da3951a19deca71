"""LAE (Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient Tuning",
ICCV 2023), with LAMDA-PILOT's hyperparameters (``models/lae.py``, ``utils/inc_net.py: LAE``,
``exps/lae*.json``) and switches between PILOT's schedule and the official code's (gqk/LAE
``main.py``); docs/methods.md, LAE section.

    frozen ViT f, online PET θ_on and offline PET θ_off (one module in each of blocks 0-4,
    pilot/backbones/lae_pet.py), one linear head g over all classes
    session t, epochs e = 0..E-1 (one Adam optimiser, built when the session starts):
        θ_on is frozen while e < F (num_freeze_epochs): only g learns     [learning: calibrated speed]
        per batch:  L = CE(g(f(x; θ_on)) with the old classes at -inf, y);  Adam step
                    θ_off <- d θ_off + (1 - d) θ_on        after every step [accumulation, d = ema_decay]
    predict: p_c = max(softmax(g(f(x; θ_on)))_c, softmax(g(f(x; θ_off)))_c) over the seen classes  [ensemble]

Official code (defaults): no freezing in session 0; θ_off starts as a copy of θ_on when session 1
begins and is averaged from then on; session 0 predicts with θ_on alone. LAMDA-PILOT
(``freeze_first_session`` and ``offline_from_start`` true): session 0 freezes too; θ_off is a copy
of the *untrained* θ_on, averaged from the first step of session 0 and in the ensemble from session 0
on (with d = 0.9999 it stays close to that initial PET for the whole run).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pilot.backbones.lae_pet import build_pets, check_pet_layers, pets_attached
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.learners.training import EpochHook, build_optimizer, train_epochs
from pilot.modules.classifiers import linear_head
from pilot.modules.masking import mask_old_classes, seen_class_logits
from pilot.modules.precision import FP32Linear
from pilot.registry import register_learner
from pilot.schema import NonNegativeInt, PositiveInt, Probability


def ensemble_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """LAE's ensemble of experts (reference ``_compute_accuracy``, official ``eval_epoch``): the class-wise
    maximum of the experts' softmax probabilities, ``p_c = max_k softmax(z_k)_c``, in float32."""
    return torch.stack([z.float().softmax(dim=-1) for z in logits]).amax(dim=0)


def lae_head(dim: int, num_classes: int, init: str = "pilot") -> FP32Linear:
    """The linear head, bias 0. ``pilot``: Kaiming-uniform with gain 1, U(±sqrt(3 / dim)) (PILOT's
    ``SimpleLinear``); ``official``: N(0, 0.001²) (gqk/LAE ``SimpleHead.weights_init``)."""
    head = linear_head(dim, num_classes, init="torch")
    with torch.no_grad():
        if init == "pilot":
            nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        elif init == "official":
            nn.init.normal_(head.weight, std=0.001)
        else:
            raise ValueError(f"head_init={init!r}: use pilot or official")
        nn.init.zeros_(head.bias)
    return head


def _report_from(hook: EpochHook | None, offset: int, epoch: int, loss: float, lr: float) -> None:
    if hook is not None:
        hook(epoch + offset, loss, lr)


@register_learner("lae")
class LAE(Learner):
    """Frozen ViT, online and offline PET modules, one linear head; ensemble of the two at inference."""

    requires_vit = True

    num_freeze_epochs: NonNegativeInt = 3
    pet: Literal["prefix", "adapter", "lora"] = "prefix"
    pet_layers: Sequence[NonNegativeInt] = (0, 1, 2, 3, 4)
    pet_length: PositiveInt = 10
    pet_rank: PositiveInt = 5
    prefix_compensation: bool = True
    ema_decay: Probability = 0.9999
    freeze_first_session: bool = False
    offline_from_start: bool = False
    head_init: Literal["pilot", "official"] = "pilot"

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.backbone.freeze()
        self.eval_batch_size = int(self.eval_batch_size)
        self.layers = [int(i) for i in self.pet_layers]
        vit = self.backbone.vit
        check_pet_layers(vit, self.pet, self.layers)
        dim = int(vit.embed_dim)
        self.online = build_pets(
            self.pet, dim, len(self.layers), self.pet_length, self.pet_rank, self.prefix_compensation
        )
        self.offline = copy.deepcopy(self.online).requires_grad_(False)
        self.head = lae_head(dim, self.scenario.num_classes, self.head_init)
        self.session = 0

    # ------------------------------------------------------------------------------ structure
    @property
    def offline_in_use(self) -> bool:
        """Whether the offline PET is averaged in the current session and joins the ensemble."""
        return self.offline_from_start or self.session > 0

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.session = info.index
        if info.index == 1 and not self.offline_from_start:
            self.offline.load_state_dict(self.online.state_dict())  # official: the EMA starts from θ_on of session 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """One momentum step of the offline PET: θ_off <- d θ_off + (1 - d) θ_on."""
        d = self.ema_decay
        for offline, online in zip(self.offline.parameters(), self.online.parameters()):
            offline.copy_(offline * d + online * (1.0 - d))

    # ------------------------------------------------------------------------------- training
    def logits(self, images: torch.Tensor, pets: nn.ModuleList) -> torch.Tensor:
        """Head logits ``[B, all classes]`` of the ViT with ``pets`` attached."""
        with pets_attached(self.backbone.vit, self.layers, pets):
            features = self.backbone(images)
        return self.head(features)

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = mask_old_classes(self.logits(batch.images, self.online), self.known, self.total)
        return F.cross_entropy(logits, batch.labels)

    def frozen_epochs(self) -> int:
        """Epochs of this session in which θ_on is frozen (the reference: the first ``num_freeze_epochs``)."""
        frozen = self.num_freeze_epochs if self.session > 0 or self.freeze_first_session else 0
        return min(frozen, self.epochs)

    def train_session(self, session: SessionData) -> None:
        """Two phases of the shared epoch loop on *one* optimiser over the head and θ_on: with θ_on frozen
        (no gradient, so Adam leaves it and its moments untouched), then with it trained. The offline
        PET follows every optimiser step (the loop's ``after_step``)."""
        params = [*self.head.parameters(), *self.online.parameters()]
        optimizer, scheduler = build_optimizer(params, self.optimizer_factory, self.scheduler)
        batches, frozen = session.train_batches(self.batch_size), self.frozen_epochs()
        phases = ((0, frozen, False, "head only"), (frozen, self.epochs, True, "head + PET"))
        try:
            for start, stop, pet_learns, what in phases:
                if stop <= start:
                    continue
                self.online.requires_grad_(pet_learns)
                train_epochs(
                    batches,
                    stop - start,
                    self.loss,
                    optimizer,
                    self.runtime,
                    scheduler,
                    f"LAE s{self.session} {what}",
                    on_epoch=partial(_report_from, getattr(self.runtime, "on_epoch", None), start),
                    after_step=self.accumulate if self.offline_in_use else None,
                )
        finally:
            self.online.requires_grad_(True)

    # ------------------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        experts = [self.online, self.offline] if self.offline_in_use else [self.online]
        with self.runtime.autocast():
            logits = [seen_class_logits(self.logits(batch.images, pets), self.total) for pets in experts]
        return ensemble_probabilities(logits)
