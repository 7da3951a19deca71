"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024).

No training: a frozen backbone and a cosine classifier whose row for each class is the mean feature
of that class's training images under the test transform (docs/methods.md §5).

    logit_c(x) = cos(f(x), mu_c),   mu_c = mean_{x in X_c} f(x)

Prototypes never change once written, so the final accuracy does not depend on the split.

The backbone's features of the prototype pass and of the test images go through a
:class:`~pilot.modules.feature_store.FeatureStore`: with pretrained weights they are kept on disk
(``runtime.feature_cache``), so the other seeds of a sweep read them instead of running the backbone.
"""

from __future__ import annotations

import torch

from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import InferenceSetup, Learner
from pilot.modules.classifiers import CosineLinear, class_means
from pilot.modules.feature_store import FeatureStore
from pilot.registry import register_learner


@register_learner("simplecil")
class SimpleCIL(Learner):
    """Cosine nearest-class-mean on frozen pretrained features."""

    def __init__(self, setup: InferenceSetup) -> None:
        super().__init__(setup)
        self.backbone.freeze()
        # Rows are written, never trained, and sigma stays 1 (docs/methods.md §0.5).
        self.head = CosineLinear(self.backbone.feature_dim, learn_sigma=False).requires_grad_(False)
        # Test features in memory for the run, and on disk across runs when the weights are pretrained.
        self.features = FeatureStore(self.runtime, "backbone/pooled")

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.head.grow(info.total, init="zeros")

    def end_session(self, session: SessionData) -> None:
        cache = self.features if self.features.on_disk else None  # each training image passes once per run
        feats, labels = self.class_features(session, self.backbone, self.batch_size, "prototypes", cache=cache)
        self.head.assign(session.info.new_classes, class_means(feats, labels, session.info.new_classes))

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self.features(batch, self.backbone, self.runtime)
        return self.head(feats)
