"""FeCAM (Goswami et al., "FeCAM: Exploiting the Heterogeneity of Class Distributions in Exemplar-Free
Continual Learning", NeurIPS 2023), as in LAMDA-PILOT ``models/fecam.py`` (docs/methods.md §7).

Session 0 tunes one AdaptFormer adapter set with a cosine head, as APER-Adapter
(:mod:`pilot.learners.first_session`), and freezes it. At the end of every session, session 0
included, each new class gets a centre ``m_c`` and the pseudo-inverse ``P_c`` of a shrunk, normalised
covariance of its tuned features (training images, test transform); a test feature ``f`` scores

    logit_c(f) = -(f_hat - m_c)^T P_c (f_hat - m_c),     f_hat = f / ||f||

(prediction: the class at the smallest Mahalanobis distance). ``covariance`` picks how ``m_c`` and
the matrix are built (:mod:`pilot.modules.mahalanobis`):

* ``pilot`` (default, LAMDA-PILOT): covariance of the raw features + ``shrink * I`` (shrink = 100),
  then ``torch.corrcoef`` of that matrix (the correlation between its rows); ``m_c`` = normalised
  mean of the raw features;
* ``paper`` (official dipamgoswami/FeCAM, ViT script): features l2-normalised first; covariance
  shrunk by ``gamma1 * mean(diag) * I + gamma2 * mean(off-diag) * (1 - I)`` (gamma1 = 1, gamma2 = 0),
  then divided by ``s s^T`` (s = standard deviations); ``m_c`` = mean of the normalised features.

The tuned model is fixed after session 0, so test features are cached across sessions.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import LearnerSetup
from pilot.learners.first_session import AdapterTuned
from pilot.modules.mahalanobis import ClassMahalanobis
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat


@register_learner("fecam")
class FeCAM(AdapterTuned):
    """Adapter tuned in session 0, then per-class Mahalanobis distances with shrunk, normalised covariances."""

    covariance: Literal["pilot", "paper"] = "pilot"
    shrink: NonNegativeFloat = 100.0
    gamma1: NonNegativeFloat = 1.0
    gamma2: NonNegativeFloat = 0.0

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.classes = ClassMahalanobis(
            self.backbone.feature_dim, self.covariance, self.shrink, self.gamma1, self.gamma2
        )

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.classes.grow(info.total)

    @torch.no_grad()
    def end_session(self, session: SessionData) -> None:
        info = session.info
        # eval_mode: adapter dropout off (reference replace_fc: model.eval())
        feats, labels = self.class_features(
            session, self.tuned_features, self.prototype_batch_size, "class statistics", eval_mode=self
        )
        self.classes.update(feats, labels, info.new_classes)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self.frozen_features(batch, self.tuned_features)
        return -self.classes(feats)
