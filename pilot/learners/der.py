"""DER (Yan, Xie, He, "DER: Dynamically Expandable Representation for Class Incremental Learning", CVPR 2021),
as LAMDA-PILOT runs it on a pre-trained backbone (``models/der.py``, ``utils/inc_net.py`` ``DERNet``,
``exps/der.json``, ``der_inr.json``; docs/methods.md, DER).

Session T adds a backbone f_T, a copy of f_{T-1} as trained (session 0: the pre-trained backbone), and
freezes f_0..f_{T-1} (no gradient, eval mode). With the super-feature ``phi(x) = [f_0(x); ...; f_T(x)]``:

    logits     = W phi(x) + b                        over all seen classes (old block of W, b kept)
    aux logits = W_aux f_T(x) + b_aux                over |C_T| + 1 classes (new classes, "old")
    L          = CE(logits, y) + lambda_a CE(aux logits, y_aux)       (T > 0; session 0: CE alone)
    y_aux      = y - known + 1 for the session's classes, 0 for old ones        (lambda_a = 1)

trained on the session's images and the exemplar memory (herding on ``phi``, :class:`ReplayLearner`),
SGD with momentum 0.9 (session 0: the ``init_*`` settings). Prediction: argmax of the logits; NME on
``phi`` beside it. The mechanisms are :mod:`pilot.modules.growing`.

PILOT's DER keeps only the dynamic expansion: no channel masks or pruning (as its own comment says),
no classifier re-balancing stage, and PyCIL's weight aligning after each session is commented out
(``weight_align=true`` restores it). Memory: one backbone copy per session (ViT-B/16: 86 M parameters,
343 MB in float32, plus gradients and momentum of the trained one); every session's forward and each
checkpoint grow with the number of copies. Works with any backbone (ViT or CNN).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import LearnerSetup
from pilot.learners.replay import ReplayLearner
from pilot.modules.growing import (
    GrowingClassifier,
    align_weights,
    auxiliary_loss,
    concat_features,
    freeze,
    keep_frozen_in_eval,
)
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, PositiveInt


@register_learner("der")
class DER(ReplayLearner):
    """One backbone per session, concatenated features, a growing linear classifier and an auxiliary head."""

    aux_weight: NonNegativeFloat = 1.0
    weight_align: bool = False
    init_epochs: PositiveInt = 10

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.grown = nn.ModuleList()  # the extractors of sessions 1, 2, ... (session 0's is self.backbone)
        self.classifier = GrowingClassifier()

    # ---------------------------------------------------------------------------- structure
    def extractors(self) -> list[nn.Module]:
        """f_0, ..., f_T: the modules whose outputs are concatenated."""
        return [self.backbone, *self.grown]

    def extractor_dim(self) -> int:
        return self.backbone.feature_dim

    def new_extractor(self, info: SessionInfo) -> nn.Module | None:
        """The extractor session ``info`` adds (None: the first one, ``self.backbone``, is already there):
        a copy of the newest one, as PILOT's ``update_fc`` loads the previous backbone's state dict."""
        return copy.deepcopy(self.extractors()[-1]) if info.index > 0 else None

    def set_trainable(self, info: SessionInfo) -> None:
        """Freeze every extractor but the newest (PILOT ``incremental_train``)."""
        for extractor in self.extractors()[:-1]:
            freeze(extractor)

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        new = self.new_extractor(info)
        if new is not None:
            self.grown.append(new.requires_grad_(True).train(self.training))
        self.set_trainable(info)
        self.train(self.training)  # frozen extractors to eval mode
        dim = self.extractor_dim()
        device = next(self.backbone.parameters()).device
        self.classifier.grow(dim * len(self.extractors()), dim, info.total, info.num_new, device)

    def train(self, mode: bool = True) -> "DER":
        super().train(mode)
        keep_frozen_in_eval([self.backbone, *self.grown])  # PILOT: frozen extractors in eval mode every epoch
        return self

    # ----------------------------------------------------------------------------- forward
    def extractor_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[f_0(x), ..., f_T(x)]``."""
        return [extractor(images) for extractor in self.extractors()]

    def exemplar_features(self, images: torch.Tensor) -> torch.Tensor:
        """``phi(x)``: herding, NME and the classifier read it (PILOT ``extract_vector``)."""
        return concat_features(self.extractor_outputs(images))

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The classifier's CE and (sessions > 0) the auxiliary CE on the batch, before weighting."""
        outputs = self.extractor_outputs(batch.images)
        logits = self.classifier(concat_features(outputs))
        terms = {"clf": F.cross_entropy(logits, batch.labels)}
        if self.session_index > 0 and self.aux_weight > 0:
            terms["aux"] = auxiliary_loss(self.classifier.auxiliary(outputs[-1]), batch.labels, self.known)
        return terms

    def loss(self, batch: Batch) -> torch.Tensor:
        terms = self.losses(batch)
        return terms["clf"] + self.aux_weight * terms["aux"] if "aux" in terms else terms["clf"]

    # ------------------------------------------------------------------------------- hooks
    def train_session(self, session: SessionData) -> None:
        self.train_epochs(session, self.loss)
        if self.weight_align and session.info.index > 0 and self.classifier.fc is not None:
            align_weights(self.classifier.fc, session.info.num_new)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.classifier(self.eval_features(batch))
