"""The flow L2P and DualPrompt share (docs/methods.md §1-2): a frozen query picks prompts from a pool by
key, the prompted ViT classifies, and the selected keys are pulled towards the queries::

    q   = f(x)[CLS]                                   frozen, unprompted; cached for test images
    ids = top-k_i cos(q, k_i)                         batch-voted if enabled, or forced (DualPrompt)
    L   = CE(mask_old(logits(x, ids)), y) - pull_coeff * sum_{i in ids} cos(q, k_i) / B

Subclasses build ``self.pool`` (a :class:`PromptPool`) and say how the selected prompts enter the
ViT (:meth:`PromptPoolLearner.logits`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from pilot.backbones.prompted_vit import PromptedViT
from pilot.data.pipeline import Batch, SessionData
from pilot.learners.base import Learner, LearnerSetup
from pilot.modules.feature_store import FeatureStore
from pilot.modules.masking import mask_old_classes, seen_class_logits
from pilot.modules.prompt_pools import PromptPool, vote_aligned_batch_size
from pilot.schema import NonNegativeFloat, PositiveInt


class PromptPoolLearner(Learner):
    """Frozen ViT + key-query prompt pool + one linear head over all classes."""

    requires_vit = True
    pool: PromptPool

    pool_size: PositiveInt = 10
    top_k: PositiveInt = 5
    batchwise_prompt: bool = True  # training batches vote for their prompts
    batchwise_prompt_eval: bool = True  # test batches vote, in groups of vote_batch_size
    vote_batch_size: PositiveInt = 16  # the reference's test batch size
    pull_coeff: NonNegativeFloat = 0.1

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.backbone.freeze()
        self.vit = PromptedViT(self.backbone.vit, prefix_layers=self.prefix_layers())
        # q(x) of test images: the frozen ViT never changes, so they are kept for the run and on disk for the
        # sweep (modules/feature_store.py; pretrained weights only).
        self.queries = FeatureStore(self.runtime, "vit/query")
        # Test batches are a whole number of vote groups.
        self.eval_batch_size = vote_aligned_batch_size(self.eval_batch_size, self.vote_batch_size)

    def prefix_layers(self) -> list[int]:
        """The ViT blocks that take prefixes (prefix tuning); default none (prompt tuning only)."""
        return []

    @abstractmethod
    def logits(self, images: torch.Tensor, indices: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """Head logits ``[B, all classes]`` of the ViT prompted with pool entries ``indices`` ``[B, k]``.

        ``group_size``: the reference's batch, for a forward that depends on a sample's position in
        it (DualPrompt's ``reference_prefix_layout``): training passes None (the batch is the
        reference's), :meth:`predict` passes ``vote_batch_size`` (the reference's test batches)."""

    def forced_prompts(self, device: torch.device) -> torch.Tensor | None:
        """Pool ids every training sample must use instead of the key match (default: none)."""
        return None

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self.queries(batch, self.vit.query)
        selection = self.pool.select(query, batchwise=self.batchwise_prompt, forced=self.forced_prompts(query.device))
        logits = mask_old_classes(self.logits(batch.images, selection.indices), self.known, self.total)
        return F.cross_entropy(logits, batch.labels) - self.pull_coeff * selection.pull

    def train_session(self, session: SessionData) -> None:
        self.train_epochs(session, self.loss)

    @property
    def eval_unit(self) -> int:
        """Test batches vote per group of ``vote_batch_size`` samples: data-parallel evaluation keeps groups whole."""
        batch_dependent = self.batchwise_prompt_eval or getattr(self, "reference_prefix_layout", False)
        return self.vote_batch_size if batch_dependent else 1

    @property
    def eval_protocol(self) -> str:
        """``batch-vote(b=N)`` when test batches vote for their prompts in groups of N
        (``batchwise_prompt_eval``); ``batch-prefix(b=N)`` when a sample's prefixes also come from its
        neighbours in the group (DualPrompt's ``reference_prefix_layout``); else ``per-sample``."""
        parts = []
        if self.batchwise_prompt_eval:
            parts.append(f"batch-vote(b={self.vote_batch_size})")
        if getattr(self, "reference_prefix_layout", False):  # DualPrompt only
            parts.append(f"batch-prefix(b={self.vote_batch_size})")
        return "+".join(parts) or "per-sample"

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            query = self.queries(batch, self.vit.query)
            selection = self.pool.select(query, batchwise=self.batchwise_prompt_eval, group_size=self.vote_batch_size)
            logits = self.logits(batch.images, selection.indices, group_size=self.vote_batch_size)
            return seen_class_logits(logits, self.total)
