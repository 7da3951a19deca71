"""iCaRL (Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017) on a
pre-trained backbone, as LAMDA-PILOT ``models/icarl.py`` runs it (exps/icarl.json, icarl_inr.json).

Network: PILOT's ``IncrementalNet``, the whole backbone (fine-tuned) and one linear head that grows by
the session's classes (:func:`~pilot.learners.replay.grown_linear`; old rows kept, new rows
kaiming-uniform, bias 0). Session t trains every parameter on the new classes' images plus the
exemplar memory (:class:`~pilot.learners.replay.ReplayLearner`), with SGD (``init_*`` settings in
session 0). The loss (``loss="ce_kd"``, PILOT's) is

    L = CE(z(x), y) + L_KD(z(x)[:, :K_old], z_prev(x), T)          (L_KD only for t > 0)

with ``z_prev`` the logits of the network as it was at the end of session t-1 and L_KD
:func:`~pilot.learners.replay.kd_loss` (no T^2). The paper's loss (``loss="bce"``) is a sigmoid binary
cross-entropy over all seen classes whose targets are the one-hot labels for the new classes and the
previous network's sigmoid outputs for the old ones (official code: mean over samples and classes):

    L = BCE(sigmoid(z(x)), [sigmoid(z_prev(x)), onehot(y)[:, K_old:]])

After training, the memory is reduced and filled by herding and every class mean recomputed
(:mod:`pilot.modules.exemplar_memory`). Inference: the head's logits (``acc``, PILOT's CNN accuracy)
and nearest-mean-of-exemplars scores (``acc_nme``, the paper's classifier).

The previous network: PILOT keeps a frozen deep copy made at the end of each session. Here it is copied
at the start of each session's training instead (backbone + head, eval mode, no gradient), when it
still equals the end-of-last-session network (``begin_session`` only appends head rows, which the KD
slice drops), and freed after training: checkpoints never hold it, a resumed run rebuilds it from the
restored weights, and evaluation does not hold two backbones. It costs a second backbone in memory
while training (as PILOT).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from pilot.data.pipeline import Batch, SessionData
from pilot.learners.base import LearnerSetup
from pilot.learners.replay import LinearHeadLearner, ReplayLearner, kd_loss
from pilot.registry import register_learner
from pilot.schema import PositiveFloat


def icarl_bce_loss(logits: torch.Tensor, old_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """The paper's loss: mean binary cross-entropy over samples and seen classes, targets = one-hot labels,
    with the old classes' targets replaced by the previous network's sigmoid outputs (``old_logits``)."""
    targets = F.one_hot(labels, logits.shape[1]).float()
    if old_logits is not None:
        targets[:, : old_logits.shape[1]] = torch.sigmoid(old_logits.float())
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


@register_learner("icarl")
class ICaRL(ReplayLearner, LinearHeadLearner):
    """Fine-tuned backbone + growing linear head; CE + KD on new data and exemplars; NME."""

    T: PositiveFloat = 2.0
    loss: Literal["ce_kd", "bce"] = "ce_kd"

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)

    def train_session(self, session: SessionData) -> None:
        known, head = self.known, self.head
        assert head is not None
        previous = self.previous_network() if known > 0 else None

        def loss_fn(batch: Batch) -> torch.Tensor:
            logits = head(self.backbone(batch.images))
            old = None
            if previous is not None:
                with torch.no_grad():
                    old = previous(batch.images)[:, :known]
            if self.loss == "bce":
                return icarl_bce_loss(logits, old, batch.labels)
            loss = F.cross_entropy(logits, batch.labels)
            return loss if old is None else loss + kd_loss(logits[:, :known], old, self.T)

        self.train_epochs(session, loss_fn)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        assert self.head is not None
        return self.head(self.eval_features(batch))
