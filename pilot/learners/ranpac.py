"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning",
NeurIPS 2023), as in LAMDA-PILOT ``models/ranpac.py`` (docs/methods.md §7).

Session 0 tunes one AdaptFormer adapter set with a cosine head, as APER-Adapter
(:mod:`pilot.learners.first_session`), and freezes it; there is no second (pretrained) branch. Every
session, session 0 included, then passes the new classes' training images (test transform, shuffled
order: the reference's ``train_loader_for_protonet``) through the tuned model and updates a ridge
regression on random ReLU features (:mod:`pilot.modules.ridge`):

    h = ReLU(f W),   G += sum h h^T,   Q += sum h y^T,   W_o = (G + lambda I)^-1 Q

with ``W`` ``[768, M]`` N(0, 1), fixed; ``lambda`` chosen among ``ridge_candidates`` by fitting on the
first 80% of the session's features (in that shuffled order) and measuring the MSE on the rest.
The rows of the seen classes form the readout. Scoring (``scoring``):

* ``cosine`` (LAMDA-PILOT's ``CosineLinear``): ``logit_c = sigma * cos(h, W_o[:, c])`` with sigma the
  session-0 head's trained scale (the reference carries it over);
* ``raw`` (official RanPAC/RanPAC ``CosineLinear`` with ``use_RP``): ``logit_c = h^T W_o[:, c]``.

Both the adapter and ``W`` are fixed after session 0, so test features are cached across sessions.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.base import LearnerSetup
from pilot.learners.first_session import AdapterTuned
from pilot.modules.features import extract_features
from pilot.modules.gaussian import zero_rows_to
from pilot.modules.precision import float32_compute
from pilot.modules.ridge import RIDGE_CANDIDATES, RidgeStatistics
from pilot.registry import register_learner
from pilot.schema import PositiveFloat, PositiveInt, Probability, Seed

log = logging.getLogger(__name__)


@float32_compute
def readout_logits(
    h: torch.Tensor, readout: torch.Tensor, scoring: str, sigma: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """``[B, C]`` float32 logits of expanded features ``h`` ``[B, M]`` against readout rows ``[C, M]``:
    ``sigma * cos(h, row)`` (``cosine``) or ``h . row`` (``raw``), computed in float64."""
    if scoring == "cosine":
        logits = sigma * F.linear(F.normalize(h.double(), dim=1), F.normalize(readout.double(), dim=1))
    else:
        logits = h.double() @ readout.double().T
    return logits.float()


@register_learner("ranpac")
class RanPAC(AdapterTuned):
    """Adapter tuned in session 0, then a ridge readout on random ReLU features, solved every session."""

    readout: torch.Tensor  # [seen classes, M] float32: the rows of W_o^T
    ridge: torch.Tensor  # lambda chosen in the last session (float64 scalar)

    projection_dim: PositiveInt = 10000
    projection_seed: Seed | None = None
    ridge_candidates: Sequence[PositiveFloat] = RIDGE_CANDIDATES
    ridge_fit_fraction: Probability = 0.8
    scoring: Literal["cosine", "raw"] = "cosine"

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.ridge_candidates = [float(r) for r in self.ridge_candidates]
        # projection_seed None: W comes from the global generator, which follows the run seed (as the reference).
        generator = None if self.projection_seed is None else torch.Generator().manual_seed(self.projection_seed)
        classes = self.scenario.num_classes
        self.statistics = RidgeStatistics(self.backbone.feature_dim, self.projection_dim, classes, generator)
        self.register_buffer("readout", torch.zeros(0, self.projection_dim))
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        super().check_requirements(backbone, scenario, params)
        if not 0 < float(params["ridge_fit_fraction"]) < 1:
            raise ConfigError(
                f"method.ridge_fit_fraction={params['ridge_fit_fraction']} must be strictly between 0 and 1: "
                "lambda is fitted on that share of a session's images and scored on the rest (reference: 0.8)."
            )
        if not list(params["ridge_candidates"]):
            raise ConfigError("method.ridge_candidates is empty: list at least one lambda (reference: 1e-8 .. 1e8).")

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.readout = zero_rows_to(self.readout, info.total)

    @torch.no_grad()
    def end_session(self, session: SessionData) -> None:
        info = session.info
        # The reference's train_loader_for_protonet: test transform, shuffled; lambda's 80/20 split follows that order.
        batches = session.train_batches(self.prototype_batch_size, augment=False, shuffle=True)
        feats, labels = extract_features(
            self.tuned_features, batches, self.runtime, desc=f"ridge s{info.index}", eval_mode=self
        )
        self.statistics.update(feats, labels)
        ridge, losses = self.statistics.select_ridge(feats, labels, self.ridge_candidates, self.ridge_fit_fraction)
        self.ridge.fill_(ridge)
        self.readout = self.statistics.solve(ridge)[:, : info.total].T.float().contiguous()
        log.info("RanPAC s%d: lambda = %g (held-out MSE %s)", info.index, ridge, [f"{v:.4g}" for v in losses.tolist()])

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self.frozen_features(batch, self.tuned_features)
        sigma = self.first_head.sigma if self.first_head.sigma is not None else 1.0
        return readout_logits(self.statistics.expand(feats), self.readout, self.scoring, sigma)
