"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning", CVPR 2023), as LAMDA-PILOT runs it (docs/methods.md §3).

    frozen ViT f; per prompted layer l: components P_l, keys K_l, attention vectors A_l; shared head g
    at the start of session t:  Gram-Schmidt init of the slice [t*n, (t+1)*n) of P, K, A
    for each batch (x, y) of session t (drop_last):
        q       = f(x)[CLS]                                     # frozen query, no grad
        alpha_k = cos(q * A_{l,k}, K_{l,k}),  k < (t+1)*n         # earlier slices detached
        p_l     = sum_k alpha_k P_{l,k}                          # length x dim
        z       = f(x; p_l[:length/2] key / p_l[length/2:] value prefixes in layer l)
        L       = CE(mask_old(g(z[CLS])), y) + mu * ortho penalty     (mu = 0 in the reference)
    lr_0 = lr_1 = base lr, lr_e = base lr * cos(99 pi (e-1) / (200 (K-1)))  (scheduler.shifted=true, §3.2)
    predict: the same forward with every component learned so far; logits over seen classes.

Class order: the reference runs CODA on the natural class order with seed 0 (docs/methods.md §3.5); our
``method/coda.yaml`` keeps the common seed-1993 shuffled order for fair comparisons and
``experiment=coda_reference_order`` restores the quirk.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from pilot.backbones.backbone import Backbone
from pilot.backbones.prompted_vit import Prefix, PromptedViT
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.base import Learner, LearnerSetup
from pilot.modules.classifiers import linear_head
from pilot.modules.feature_store import FeatureStore
from pilot.modules.masking import mask_old_classes, seen_class_logits
from pilot.modules.prompt_pools import CodaPromptPool
from pilot.registry import register_learner
from pilot.schema import EvenPositiveInt, NonNegativeFloat, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


@register_learner("coda")
class CodaPrompt(Learner):
    """Attention-weighted sums of prompt components as prefixes, one linear head on CLS."""

    requires_vit = True

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        """Besides the common checks: the component pool is split evenly over the sessions (at least
        one each), and a prompt's rows are halved into key and value prefixes (an even length)."""
        super().check_requirements(backbone, scenario, params)
        pool_size, length, sessions = int(params["pool_size"]), int(params["prompt_length"]), scenario.num_sessions
        if pool_size < sessions:
            raise ConfigError(
                f"method.pool_size={pool_size} prompt components cannot give one to each of the {sessions} sessions "
                f"of scenario {scenario.name} (each session owns pool_size // sessions = {pool_size // sessions}). "
                f"Raise method.pool_size to >= {sessions}, ideally a multiple of {sessions}."
            )
        if length < 2 or length % 2:
            raise ConfigError(
                f"method.prompt_length={length} must be even and >= 2: the first half of a prompt's rows are key "
                "prefixes, the second half value prefixes."
            )

    prompt_layers: Sequence[NonNegativeInt] = (0, 1, 2, 3, 4)
    drop_last: bool = True
    pool_size: PositiveInt = 100
    prompt_length: EvenPositiveInt = 8
    ortho_mu: NonNegativeFloat = 0.0

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.layers = [int(i) for i in self.prompt_layers]
        self.backbone.freeze()
        self.vit = PromptedViT(self.backbone.vit, prefix_layers=self.layers)
        self.eval_batch_size = int(self.eval_batch_size)
        self.pool = CodaPromptPool(
            len(self.layers), self.pool_size, self.prompt_length, self.vit.dim, self.scenario.num_sessions
        )
        self.head = linear_head(self.vit.dim, self.scenario.num_classes, init="torch")  # PyTorch default init (§3.1)
        self.queries = FeatureStore(self.runtime, "vit/query")  # test queries: per run and across a sweep

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.pool.begin_session(info.index)

    def prefixes(self, query: torch.Tensor, train: bool) -> tuple[dict[int, Prefix], torch.Tensor]:
        """Per prompted block: first half of the mixed prompt as key prefix, second half as value prefix."""
        prompts, penalty = self.pool(query, train=train, ortho_mu=self.ortho_mu)  # [layers, B, length, C]
        half = prompts.shape[2] // 2
        return {layer: (prompts[i, :, :half], prompts[i, :, half:]) for i, layer in enumerate(self.layers)}, penalty

    def logits(self, images: torch.Tensor, prefixes: dict[int, Prefix]) -> torch.Tensor:
        return self.head(self.vit.pooled(self.vit.forward_features(images, prefixes=prefixes)))

    def loss(self, batch: Batch) -> torch.Tensor:
        prefixes, penalty = self.prefixes(self.queries(batch, self.vit.query), train=True)
        logits = mask_old_classes(self.logits(batch.images, prefixes), self.known, self.total)
        return F.cross_entropy(logits, batch.labels) + penalty

    def train_session(self, session: SessionData) -> None:
        if len(batches := session.train_batches(self.batch_size, drop_last=self.drop_last)) == 0:
            log.warning(
                "CODA session %d: %d training images < batch_size %d with drop_last: no training step",
                session.info.index,
                batches.num_samples,
                self.batch_size,
            )
            return
        self.train_epochs(session, self.loss, batches=batches)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            prefixes, _ = self.prefixes(self.queries(batch, self.vit.query), train=False)
            return seen_class_logits(self.logits(batch.images, prefixes), self.total)
