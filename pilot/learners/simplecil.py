"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024).

No training: a frozen backbone and a cosine classifier whose row for each class is the mean feature
of that class's training images under the test transform (docs/methods.md §5).

    logit_c(x) = cos(f(x), mu_c),   mu_c = mean_{x in X_c} f(x)

Prototypes never change once written, so the final accuracy does not depend on the split.
"""

from __future__ import annotations

import torch

from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.learners.base import Learner
from pilot.modules.classifiers import CosineLinear, class_means
from pilot.modules.features import FeatureCache, extract_features
from pilot.registry import register_learner
from pilot.runtime import Runtime
from pilot.schema import PositiveInt


@register_learner("simplecil")
class SimpleCIL(Learner):
    """Cosine nearest-class-mean on frozen pretrained features."""

    def __init__(
        self,
        backbone: Backbone,
        scenario: Scenario,
        runtime: Runtime,
        *,
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt = 512,
    ) -> None:
        super().__init__(backbone, scenario, runtime)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.backbone.freeze()
        # Rows are written, never trained, and sigma stays 1 (docs/methods.md §0.5).
        self.head = CosineLinear(backbone.feature_dim, learn_sigma=False).requires_grad_(False)
        self.features = FeatureCache()

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.head.grow(info.total, init="zeros")

    def end_session(self, session: SessionData) -> None:
        batches, desc = session.prototype_batches(self.batch_size), f"prototypes s{session.info.index}"
        feats, labels = extract_features(self.backbone, batches, self.runtime, desc=desc)
        self.head.assign(session.info.new_classes, class_means(feats, labels, session.info.new_classes))

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self.features(batch, self.backbone, self.runtime)
        return self.head(feats)
