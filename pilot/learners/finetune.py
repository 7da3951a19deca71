"""Finetune: sequential fine-tuning, the lower bound of class-incremental learning, as LAMDA-PILOT
``models/finetune.py`` runs it on a pre-trained backbone (exps/finetune.json, finetune_inr.json).

Network: PILOT's ``IncrementalNet``, the whole backbone (fine-tuned) and one linear head that grows by the
session's classes (:func:`~pilot.learners.replay.grown_linear`: old rows kept, new rows kaiming-uniform,
bias 0). Session t trains every parameter, on the new classes' training images only (no memory:
``memory_size: 0`` in the reference), with the cross-entropy over the new classes' logits:

    L = CE(z(x)[:, K_old:], y - K_old)

(session 0: over all its classes). Old rows receive no gradient from the loss but stay in the optimiser
(SGD weight decay still shrinks them), as in the reference. SGD with the ``init_*`` settings in session 0
and the training settings afterwards (:class:`~pilot.learners.replay.SessionTrainedLearner`). Inference:
the head's logits over every seen class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pilot.data.pipeline import Batch, SessionData
from pilot.learners.replay import LinearHeadLearner
from pilot.registry import register_learner


@register_learner("finetune")
class Finetune(LinearHeadLearner):
    """Fine-tuned backbone + growing linear head, CE on the new classes, no memory."""

    def train_session(self, session: SessionData) -> None:
        known, head = self.known, self.head
        assert head is not None

        def loss_fn(batch: Batch) -> torch.Tensor:
            logits = head(self.backbone(batch.images))
            return F.cross_entropy(logits[:, known:], batch.labels - known)

        self.train_epochs(session, loss_fn)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        assert self.head is not None
        with self.runtime.autocast():
            feats = self.runtime.chunked(self.backbone, batch.images)
        return self.head(feats)
