"""RanPAC-mini: a cut-down RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models
for Continual Learning", NeurIPS 2023) as an out-of-tree pilot learner.

The backbone stays frozen. Its L2-normalised feature ``f`` goes through a fixed random projection and a
ReLU, ``h = relu(f P)`` (``P``: ``[d, M]``, standard normal), and a ridge regression from ``h`` to one-hot
labels is the classifier. The regression needs only two sums over every training image seen so far,

    G = sum h h^T   [M, M],      C = sum h y^T   [M, classes],      W = (G + ridge * I)^-1 C,

so each session adds its images to the sums and solves again: nothing is forgotten, and the order of
the sessions does not change the result. Left out of RanPAC: the first-session adaptation of the
backbone and the search for ``ridge`` on held-out data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.modules.features import FeatureCache
from pilot.modules.precision import autocast_off
from pilot.schema import PositiveFloat, PositiveInt, Seed


class RanPACMini(Learner):
    """Random ReLU projection of frozen features + closed-form ridge regression; no gradient training."""

    # Hyperparameters: annotated class attributes with the reference default (method.ridge=... in YAML).
    projection_dim: PositiveInt = 1000
    ridge: PositiveFloat = 1.0
    projection_seed: Seed = 0

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)  # sets self.ridge etc.; backbone, scenario, runtime, batch sizes
        self.backbone.freeze()  # frozen: its weights stay out of checkpoints
        generator = torch.Generator().manual_seed(self.projection_seed)
        # Buffers are in state_dict(), so a resumed run continues with the same P, G, C and W.
        dim = self.backbone.feature_dim
        self.register_buffer("projection", torch.randn(dim, self.projection_dim, generator=generator))
        self.register_buffer("gram", torch.zeros(self.projection_dim, self.projection_dim, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(self.projection_dim, 0, dtype=torch.float64))
        self.register_buffer("readout", torch.zeros(self.projection_dim, 0))
        self.features = FeatureCache()  # test features of the frozen backbone, computed once per run

    def begin_session(self, info: SessionInfo) -> None:
        """One more column of targets and readout per new class (zeros: no data is seen here)."""
        super().begin_session(info)
        extra = info.total - self.targets.shape[1]
        self.targets = torch.cat([self.targets, self.targets.new_zeros(self.targets.shape[0], extra)], dim=1)
        self.readout = torch.cat([self.readout, self.readout.new_zeros(self.readout.shape[0], extra)], dim=1)

    def end_session(self, session: SessionData) -> None:
        """Add the session's training images to ``G`` and ``C`` (float64), then solve for ``W``."""
        # Training images of the new classes with the test transform, no augmentation.
        feats, labels = self.class_features(session, self.backbone, self.batch_size, "ranpac")
        h = self._random_features(feats).double()
        self.gram += h.T @ h
        self.targets += h.T @ F.one_hot(labels, self.total).double()
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        self.readout = torch.linalg.solve(self.gram + self.ridge * eye, self.targets).float()

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self.features(batch, self.backbone, self.runtime)
        with autocast_off(feats.device):  # the classifier computes in float32 (see pilot.modules.precision)
            return self._random_features(feats) @ self.readout

    def _random_features(self, feats: torch.Tensor) -> torch.Tensor:
        with autocast_off(feats.device):
            return F.relu(F.normalize(feats.float(), dim=1) @ self.projection)
