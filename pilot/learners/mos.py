"""MOS (Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning", AAAI 2025),
as LAMDA-PILOT ``models/mos.py``, ``backbone/vit_mos.py`` (= the official AAAI25-MOS code; docs/methods.md §7).

Frozen ViT f; one AdaptFormer adapter set A (width 16, dropout 0.1, scale 0.1; §0.5) trained in every
session from where the previous one left it (the reference never re-initialises it); one linear head h
over every class of the dataset. Session T trains A (lr) and h (0.1 lr) with SGD and a cosine schedule:

    z = f(x; A)[CLS],  L = CE(mask_old(h(z)), y) + 0.1 * CE(M M^T / 0.8, own row),  M = [mu_0..mu_{known-1}; z_1..z_B]
    after every optimiser step (T >= 1): A <- 0.9 A + 0.1 mean(S_0..S_{T-1})     (modules/adapter_merging.py)

End of session T: snapshot S_T = A (task T's adapter); Gaussians (mean, covariance + 1e-4 I) of the new
classes under A; for T >= 1 classifier alignment of h (plain CE, 5 x batch_size samples per class);
prototypes = class means under S_0 in a cosine classifier P. Inference (self-refined, up to 4 rounds):

    p = cos(f(x; S_0), P); a_0 = task(argmax p); z_k = h(f(x; S_{a_{k-1}})), a_k = task(argmax z_k) until a_k = a_{k-1}
    score = softmax(z_last) + softmax((T + 1) p)                                   (``ensemble``)

``adapter_drift`` (default true = the reference): the reference also merges in place inside every forward
through an adapter id t >= 1 (12 merges per ViT-B pass, block l using l + 1; modules/adapter_merging.py):
in every training forward, every batch of 3 x batch_size images of a class in the statistics pass, and on
every S_t (t >= 1) once per test batch of batch_size. Adapters t >= 1 thus collapse toward the mean of the
earlier snapshots, and scores depend on the number and order of test batches (``eval_protocol``
``adapter-drift(b=batch_size)``); evaluation runs in blocks of batch_size, so scores equal the reference's
for any ``eval_batch_size``; a validation pass drifts them too. false: merge after optimiser steps only
(the paper's description); per-sample scores.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Literal, Mapping, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from pilot.backbones.adapters import AdapterSet, multi_adapter_features
from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import TRAIN, Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.base import Learner, LearnerSetup
from pilot.learners.training import OptimizerFactory, ParamGroups, SchedulerFactory, build_optimizer, train_epochs
from pilot.modules.adapter_merging import AdapterHistory, SelectedFeatures, after_each_step, self_refined_logits
from pilot.modules.alignment import align_classifier
from pilot.modules.classifiers import CosineLinear, class_means, linear_head
from pilot.modules.features import FeatureCache, evaluating, extract_features
from pilot.modules.gaussian import ClassGaussians
from pilot.modules.masking import mask_old_classes
from pilot.modules.precision import float32_compute
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability


@float32_compute
def orthogonality_loss(features: torch.Tensor, anchors: torch.Tensor, temperature: float = 0.8) -> torch.Tensor:
    """MOS's InfoNCE-style term (reference ``orth_loss``): with the rows ``M = [anchors; features]``
    (stored class means of the old classes, then the batch features), ``CE(M M^T / temperature, i)``
    for every row i, averaged over all rows. No anchors (session 0): the batch features alone."""
    m = torch.cat([anchors.to(device=features.device, dtype=torch.float32), features.float()])
    return F.cross_entropy(m @ m.T / temperature, torch.arange(len(m), device=m.device))


def adapter_features(backbone: Backbone, images: torch.Tensor, adapters: nn.Module) -> torch.Tensor:
    """``[B, D]``: the pooled feature of ``images`` under one adapter set."""
    return multi_adapter_features(backbone, backbone.vit, images, [cast(AdapterSet, adapters)])[:, 0]


@register_learner("mos")
class MOS(Learner):
    """Frozen ViT, a merged adapter set (one snapshot per task), aligned linear head, self-refined retrieval."""

    requires_vit = True
    class_task: torch.Tensor

    head_lr_scale: NonNegativeFloat = 0.1
    adapter_dim: PositiveInt = 16
    adapter_dropout: Probability = 0.1
    adapter_scale: NonNegativeFloat = 0.1
    adapter_momentum: Probability = 0.1
    adapter_drift: bool = True
    orthogonality_weight: NonNegativeFloat = 0.1
    orthogonality_temperature: PositiveFloat = 0.8
    ca_epochs: NonNegativeInt = 30
    ca_optimizer: OptimizerFactory = partial(SGD, lr=0.005, momentum=0.9, weight_decay=5e-4)
    ca_scheduler: SchedulerFactory | None = partial(CosineAnnealingLR, T_max=30)
    ca_samples_per_class: PositiveInt = 240
    ca_storage: Literal["covariance", "variance", "multi-centroid"] = "covariance"
    covariance_shrink: NonNegativeFloat = 1e-4
    refine_rounds: PositiveInt = 4
    ensemble: bool = True
    prototype_batch_size: PositiveInt = 128

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        n = self.ca_samples_per_class  # classifier alignment: n samples of every class per epoch, in batches of n
        ca = partial(
            align_classifier, epochs=self.ca_epochs, optimizer=self.ca_optimizer, runtime=self.runtime, tau=None
        )
        self.align = partial(ca, scheduler=self.ca_scheduler, samples_per_class=n, batch_size=n)  # tau None: plain CE
        # with drift, an evaluation batch holds whole reference test batches (merge blocks of batch_size)
        aligned = max(self.batch_size, self.eval_batch_size // self.batch_size * self.batch_size)
        self.eval_batch_size = aligned if self.adapter_drift else self.eval_batch_size
        self.backbone.freeze()
        dim = self.backbone.feature_dim
        self.current = AdapterSet.for_vit(
            self.backbone.vit, self.adapter_dim, self.adapter_dropout, self.adapter_scale
        )  # trains
        self.adapters = nn.ModuleList()  # S_t, one frozen snapshot per session (inference)
        self.history = AdapterHistory(self.current)  # prefix sums of the S_t
        self.head = linear_head(dim, self.scenario.num_classes)  # every class of the dataset, trunc-normal .02
        self.prototypes = CosineLinear(dim, learn_sigma=False).requires_grad_(False)  # adapter-0 class means
        self.stats = ClassGaussians(dim, self.covariance_shrink)
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long), persistent=False)
        self.features0 = FeatureCache()  # test features under S_0, which never changes once written

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        super().check_requirements(backbone, scenario, params)
        if params["ca_storage"] != "covariance":
            raise ConfigError(
                f"method.ca_storage={params['ca_storage']} is not implemented in pilot (the reference's "
                "ca_storage_efficient_method option); use method.ca_storage=covariance, the MOS default."
            )

    def drift(self, adapters: nn.Module, adapter_id: int, stage: Literal["before", "after"]) -> None:
        """With ``adapter_drift``, the reference's in-place merges of one forward through ``adapters``."""
        if self.adapter_drift:
            self.history.forward_merges(adapters, adapter_id, self.adapter_momentum, stage)

    @property
    def eval_protocol(self) -> str:  # drift: scores depend on the number and order of test batches
        return f"adapter-drift(b={self.batch_size})" if self.adapter_drift else "per-sample"

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.adapters.append(copy.deepcopy(self.current).requires_grad_(False))  # S_T once training ends
        self.history.grow(len(self.adapters))
        self.prototypes.grow(info.total)
        self.stats.grow(info.total)
        self.class_task = torch.as_tensor(self.scenario.session_of_label[: info.total], device=self.head.weight.device)

    def train_session(self, session: SessionData) -> None:
        """Train the current adapter set and the head, then keep its snapshot S_T."""
        current, known, total, task = self.current, self.known, self.total, session.info.index

        def loss_fn(batch: Batch) -> torch.Tensor:
            self.drift(current, task, "before")  # the reference: block l runs after l + 1 merges (rest: pre-step)
            feats = adapter_features(self.backbone, batch.images, current)
            ce = F.cross_entropy(mask_old_classes(self.head(feats), known, total), batch.labels)
            orth = orthogonality_loss(feats, self.stats.means[:known], self.orthogonality_temperature)
            return ce + self.orthogonality_weight * orth

        def scaled(groups: ParamGroups) -> Optimizer:  # head lr scaled before the scheduler records it
            opt = self.optimizer_factory(groups)
            opt.param_groups[1]["lr"] *= self.head_lr_scale
            return opt

        groups = [{"params": list(current.parameters())}, {"params": list(self.head.parameters())}]
        merge = partial(self.history.merge, current, task, self.adapter_momentum)  # after every step (the paper)
        factory = after_each_step(scaled, merge, before=partial(self.drift, current, task, "after"))
        optimizer, scheduler = build_optimizer(groups, factory, self.scheduler)
        batches, desc = session.train_batches(self.batch_size), f"MOS s{task}"
        train_epochs(batches, self.epochs, loss_fn, optimizer, self.runtime, scheduler, desc)
        self.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.adapters[task].load_state_dict(current.state_dict())
        self.history.record(task, current)

    def end_session(self, session: SessionData) -> None:
        info = session.info
        feats, labels = self.statistics_features(session)
        self.stats.update(feats, labels, info.new_classes)
        if info.index > 0 and self.ca_epochs > 0:  # t_c = T for every class: mean scale 1 (no scaling in MOS)
            sessions = torch.full_like(self.class_task, info.index)
            self.align(self.head, self.stats, self.class_task, sessions, info.index)
        batches, desc = session.prototype_batches(self.prototype_batch_size), f"prototypes s{info.index}"
        under0 = partial(adapter_features, self.backbone, adapters=self.adapters[0])
        feats, labels = extract_features(under0, batches, self.runtime, desc=desc, eval_mode=self)
        self.prototypes.assign(info.new_classes, class_means(feats, labels, info.new_classes))

    @torch.inference_mode()
    def statistics_features(self, session: SessionData) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (float32) of the new classes under the current adapter, per class in batches of 3 x batch_size."""
        feats, labels, task = [], [], session.info.index
        with evaluating(self):
            for c in session.info.new_classes:
                for batch in session.pipeline.batches(TRAIN, range(c, c + 1), 3 * self.batch_size):
                    self.drift(self.current, task, "before")
                    out = self.runtime.chunked(lambda x: adapter_features(self.backbone, x, self.current), batch.images)
                    self.drift(self.current, task, "after")
                    feats.append(out.float())
                    labels.append(batch.labels)
        return torch.cat(feats), torch.cat(labels)

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            f0 = self.features0(batch, lambda x: adapter_features(self.backbone, x, self.adapters[0]), self.runtime)
        proto = self.prototypes(f0.float())
        block = self.batch_size if self.adapter_drift else len(batch)
        scores = []
        for start in range(0, len(batch), block):  # with drift: one reference test batch (of batch_size)
            for t in range(1, len(self.adapters)):
                self.drift(self.adapters[t], t, "before")
            part = slice(start, start + block)
            scores.append(self.refined_scores(batch.images[part], f0[part].float(), proto[part]))
            for t in range(1, len(self.adapters)):
                self.drift(self.adapters[t], t, "after")
        return torch.cat(scores)

    def refined_scores(self, images: torch.Tensor, f0: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        """Self-refined head logits of ``images`` (ensembled with the prototype logits); features under
        an adapter are computed only for the samples whose retrieval visits it."""

        def compute(j: int, rows: torch.Tensor) -> torch.Tensor:
            with self.runtime.autocast():
                fn = partial(adapter_features, self.backbone, adapters=self.adapters[j])
                return self.runtime.chunked(fn, images[rows]).float()

        features = SelectedFeatures(compute, len(images))
        features.put(0, f0)
        first = self.class_task[proto.argmax(dim=1)]
        logits_under = lambda rows, tasks: self.head(features(rows, tasks))[:, : self.total]  # noqa: E731
        final = self_refined_logits(first, logits_under, self.class_task, self.refine_rounds)
        if not self.ensemble:
            return final
        return final.softmax(dim=1) + (proto * len(self.adapters)).softmax(dim=1)  # len(adapters) = T + 1

    # ------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self.features0.clear()
        return super().load_state_dict(state, strict=strict, assign=assign)
