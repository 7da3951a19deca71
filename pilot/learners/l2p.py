"""L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022), as LAMDA-PILOT runs it
(METHODS.md §1).

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

import torch
import torch.nn.functional as F

from pilot.backbones.backbone import Backbone
from pilot.backbones.prompting import PromptedViT
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario
from pilot.learners.base import Learner
from pilot.learners.training import OptimizerFactory, SchedulerFactory, train_trainable
from pilot.modules.classifiers import linear_head
from pilot.modules.features import FeatureCache
from pilot.modules.masking import mask_old_classes, seen_class_logits
from pilot.modules.prompts import PromptPool, vote_aligned_batch_size
from pilot.runtime import Runtime


class L2P(Learner):
    """Prompt pool with key-query selection, prompt tuning, one linear head over all classes."""

    requires_vit = True

    def __init__(
        self,
        backbone: Backbone,
        scenario: Scenario,
        runtime: Runtime,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        epochs: int = 5,
        batch_size: int = 16,
        eval_batch_size: int = 512,
        vote_batch_size: int = 16,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        batchwise_prompt: bool = True,
        batchwise_prompt_eval: bool = True,
        pull_coeff: float = 0.1,
    ) -> None:
        super().__init__(backbone, scenario, runtime)
        self.backbone.freeze()
        self.vit = PromptedViT(backbone.vit)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.epochs, self.batch_size, self.vote_batch_size = int(epochs), int(batch_size), int(vote_batch_size)
        self.eval_batch_size = vote_aligned_batch_size(int(eval_batch_size), self.vote_batch_size)
        self.top_k, self.prompt_length = int(top_k), int(prompt_length)
        self.batchwise_prompt, self.batchwise_prompt_eval = bool(batchwise_prompt), bool(batchwise_prompt_eval)
        self.pull_coeff = float(pull_coeff)
        self.pool = PromptPool(int(pool_size), self.prompt_length, self.vit.dim, self.top_k)
        self.head = linear_head(self.vit.dim, scenario.num_classes)
        self.queries = FeatureCache()  # q(x) of test images: the frozen model never changes

    def logits(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Head logits ``[B, all classes]`` with the prompts ``indices`` ``[B, k]`` inserted after CLS."""
        prompts = self.pool.gather(indices).flatten(1, 2)  # [B, k * length, C]
        features = self.vit.forward_features(images, tokens=prompts)
        return self.head(self.vit.prompt_mean(features, prompts.shape[1]))

    def loss(self, batch: Batch) -> torch.Tensor:
        query = self.queries(batch, self.vit.query)
        selection = self.pool.select(query, batchwise=self.batchwise_prompt)
        logits = mask_old_classes(self.logits(batch.images, selection.indices), self.known, self.total)
        return F.cross_entropy(logits, batch.labels) - self.pull_coeff * selection.pull

    def train_session(self, session: SessionData) -> None:
        train_trainable(
            self,
            session.train_batches(self.batch_size),
            self.epochs,
            self.loss,
            self.optimizer,
            self.runtime,
            self.scheduler,
            desc=f"l2p s{session.info.index}",
        )

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            query = self.queries(batch, self.vit.query)
            indices = self.pool.select(
                query, batchwise=self.batchwise_prompt_eval, group_size=self.vote_batch_size
            ).indices
            return seen_class_logits(self.logits(batch.images, indices), self.total)
