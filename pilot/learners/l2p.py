"""L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022), as LAMDA-PILOT runs it
(docs/methods.md §1).

    frozen ViT f, prompt pool {(k_i, P_i)}_{i<M}, shared linear head g
    for each session t, for each batch (x, y):
        q   = f(x)[CLS]                                   # frozen query, no prompts, no grad
        ids = top-k_i cos(q, k_i)                         # per sample; batch-wise vote if enabled
        z   = f([CLS, P_ids, patches])                    # prompt tuning, prompts get CLS's position
        h   = mean of the prompt-token outputs of z       # head_type = "prompt"
        L   = CE(mask_old(g(h)), y) - 0.1 * sum_{i in ids} cos(q, k_i) / B
    predict: the same forward, logits over the seen classes.

Prompts and keys are shared by all sessions (no prompt mask, no copying); the optimiser is rebuilt
at every session.
"""

from __future__ import annotations

from typing import Any

import torch

from pilot.learners.base import LearnerSetup
from pilot.learners.prompt_pool_learner import PromptPoolLearner
from pilot.modules.classifiers import linear_head
from pilot.modules.prompt_pools import PromptPool
from pilot.registry import register_learner
from pilot.schema import PositiveInt


@register_learner("l2p")
class L2P(PromptPoolLearner):
    """Prompt pool with key-query selection, prompt tuning, one linear head over all classes."""

    prompt_length: PositiveInt = 5  # the pool's other settings: PromptPoolLearner

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.pool = PromptPool(self.pool_size, self.prompt_length, self.vit.dim, self.top_k)
        self.head = linear_head(self.vit.dim, self.scenario.num_classes)

    def logits(self, images: torch.Tensor, indices: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """Prompts ``indices`` inserted after CLS; the head reads the mean of the prompt-token outputs
        (per sample: ``group_size`` plays no part)."""
        prompts = self.pool.gather(indices).flatten(1, 2)  # [B, k * length, C]
        features = self.vit.forward_features(images, tokens=prompts)
        return self.head(self.vit.prompt_mean(features, prompts.shape[1]))
