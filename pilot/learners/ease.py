"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024), as in LAMDA-PILOT ``models/ease.py`` (docs/methods.md §4).

A frozen ViT and one AdaptFormer adapter set per session. Session t trains a fresh set (and a
cosine proxy head over the session's classes) with CE; then the set is frozen for good.
Subspace j = the ViT's pooled feature under adapter set j. A prototype matrix ``P[c, j]``
(class c, subspace j, unnormalised class means under the test transform) is kept for every seen
class in every subspace:

* at the end of session T the new classes get real prototypes in all subspaces j = 0..T;
* an old class c of session i < T has no data in a later subspace j in (i, T]; its prototype there is
  synthesised (semantic-guided complement), recomputed for all pairs every session:

      A  = P[sessions j..T, i],  B = P[sessions j..T, j],  Â = P[session i, i]
      W  = softmax_rows(cos(Â, A))            (raw cosines, temperature 1)
      P[session i, j] = W @ B

Inference (``use_reweight``): with f_j the feature under set j and i the session of class c,

    logit_c = cos(f_i, P[c, i]) + (alpha / T) * sum_{j != i} cos(f_j, P[c, j]),   alpha = 0.1

(sigma = 1; at T = 0 only the first term.)

Cost: T+1 adapted ViT passes per test image, run as one batched pass
(:func:`pilot.backbones.adapters.multi_adapter_features`). Frozen sets give fixed features on the
deterministic test images, so they are cached per set (:class:`FeatureCache`): after session T the
test images of earlier sessions need only the new set T, and each (image, set) pair is computed
once per run.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from pilot.backbones.adapters import AdapterSet, check_adaptable, multi_adapter_features
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.modules.classifiers import CosineLinear, class_means
from pilot.modules.features import FeatureCache
from pilot.modules.precision import float32_compute
from pilot.registry import register_learner
from pilot.schema import NonNegativeFloat, PositiveInt, Probability


@float32_compute
def complement_prototypes(prototypes: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Semantic-guided prototype complement (docs/methods.md §4.2 step 2; reference ``solve_sim_reset``).

    ``prototypes`` ``[C, S, D]``: class c's prototype in subspace j, real for every j >= session(c);
    ``bounds``: first class of each of the S sessions, then C (``bounds[t]:bounds[t+1]`` = session t).
    Returns a copy in which ``P[session i, j]`` for every i < j <= S-1 is ``softmax(cos(Â, A)) @ B``.
    Reads only real prototypes, so the order of the (i, j) pairs does not matter.
    """
    out = prototypes.clone()
    last = prototypes.shape[1] - 1
    for i in range(last):
        old = slice(bounds[i], bounds[i + 1])
        a_hat = F.normalize(prototypes[old, i].float(), dim=1)
        for j in range(i + 1, last + 1):
            newer = slice(bounds[j], bounds[-1])
            a = F.normalize(prototypes[newer, i].float(), dim=1)
            weights = torch.softmax(a_hat @ a.T, dim=1)
            out[old, j] = (weights @ prototypes[newer, j].float()).to(out.dtype)
    return out


@float32_compute
def ensemble_logits(
    features: torch.Tensor, prototypes: torch.Tensor, class_session: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """EASE's re-weighted subspace ensemble (reference ``EaseCosineLinear.forward_reweight``).

    ``features`` ``[B, S, D]`` (S = T+1 subspaces), ``prototypes`` ``[C, S, D]``, ``class_session``
    ``[C]``. Each subspace block is cosine-normalised separately; class c of session i weighs its own
    subspace 1 and every other alpha / T. Returns ``[B, C]``.
    """
    cos = torch.einsum("bsd,csd->bcs", F.normalize(features.float(), dim=-1), F.normalize(prototypes.float(), dim=-1))
    last = features.shape[1] - 1
    if last == 0:
        return cos[..., 0]
    weights = torch.full(prototypes.shape[:2], alpha / last, device=cos.device, dtype=cos.dtype)
    weights[torch.arange(len(class_session), device=cos.device), class_session.to(cos.device)] = 1.0
    return (cos * weights).sum(dim=-1)


@register_learner("ease")
class EASE(Learner):
    """Frozen ViT + one adapter set per session, prototype ensemble over all subspaces."""

    requires_vit = True
    prototypes: torch.Tensor  # [seen classes, subspaces, D] buffer
    class_session: torch.Tensor

    adapter_dim: PositiveInt = 64
    adapter_dropout: Probability = 0.1
    sets_per_pass: PositiveInt | None = None
    adapter_scale: NonNegativeFloat = 0.1
    alpha: NonNegativeFloat = 0.1
    prototype_batch_size: PositiveInt = 128
    cache_features: bool = True

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        check_adaptable(self.backbone.vit)
        self.backbone.freeze()
        dim = self.backbone.feature_dim
        self.adapters = nn.ModuleList()  # one AdapterSet per session; all in state_dict()
        self.proxy_fc = CosineLinear(dim, learn_sigma=True)  # current classes only, training only
        self.register_buffer("prototypes", torch.zeros(0, 0, dim))  # [classes, subspaces, dim]
        self.register_buffer("class_session", torch.zeros(0, dtype=torch.long), persistent=False)
        self._caches: list[FeatureCache] = []  # per adapter set, test features of frozen sets

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        device = self.prototypes.device
        for old in self.adapters:
            old.requires_grad_(False)
        self.adapters.append(
            AdapterSet.for_vit(self.backbone.vit, self.adapter_dim, self.adapter_dropout, self.adapter_scale).to(device)
        )
        proxy = CosineLinear(self.backbone.feature_dim, learn_sigma=True)
        proxy.grow(info.num_new, init="uniform")
        self.proxy_fc = proxy.to(device)
        subspaces = len(self.adapters)
        grown = torch.zeros(info.total, subspaces, self.backbone.feature_dim, device=device)
        grown[: self.prototypes.shape[0], : self.prototypes.shape[1]] = self.prototypes
        self.prototypes = grown
        self.class_session = torch.as_tensor(self.scenario.session_of_label[: info.total], device=device)

    def train_session(self, session: SessionData) -> None:
        current, known = self.adapter_sets[-1], self.known

        def loss_fn(batch: Batch) -> torch.Tensor:
            feats = multi_adapter_features(self.backbone, self.backbone.vit, batch.images, [current])[:, 0]
            return F.cross_entropy(self.proxy_fc(feats), batch.labels - known)

        self.train_epochs(session, loss_fn, params=[*current.parameters(), *self.proxy_fc.parameters()])

    @torch.no_grad()
    def end_session(self, session: SessionData) -> None:
        info = session.info
        self.adapters[-1].requires_grad_(False)  # final: its features may now be cached
        self.proxy_fc.requires_grad_(False)
        # eval_mode: adapter dropout off for prototypes (reference replace_fc: model.eval())
        feats, labels = self.class_features(
            session,
            lambda x: self.subspace_features(x).flatten(1),
            self.prototype_batch_size,
            "prototypes",
            eval_mode=self,
        )
        subspaces, dim = len(self.adapters), self.backbone.feature_dim
        means = class_means(feats, labels, info.new_classes).view(info.num_new, subspaces, dim)
        self.prototypes[info.known : info.total] = means
        bounds = [s.known for s in self.scenario.sessions[:subspaces]] + [info.total]
        self.prototypes.copy_(complement_prototypes(self.prototypes, bounds))

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            feats = self._cached_subspace_features(batch)
        return ensemble_logits(feats, self.prototypes, self.class_session, self.alpha)

    # --------------------------------------------------------------------------- features
    @property
    def adapter_sets(self) -> list[AdapterSet]:
        """The adapter sets so far, one per session (``self.adapters`` as a typed list)."""
        return cast(list[AdapterSet], list(self.adapters))

    def subspace_features(self, images: torch.Tensor, sets: Sequence[AdapterSet] | None = None) -> torch.Tensor:
        """``[B, K, D]``: the pooled feature of ``images`` under each adapter set (default: all),
        ``sets_per_pass`` sets per batched pass (None: all in one)."""
        sets = self.adapter_sets if sets is None else list(sets)
        step = self.sets_per_pass or len(sets)
        parts = [
            multi_adapter_features(self.backbone, self.backbone.vit, images, sets[k : k + step])
            for k in range(0, len(sets), step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _cached_subspace_features(self, batch: Batch) -> torch.Tensor:
        """Features under every set; frozen sets are looked up in / stored into their cache, the
        missing sets are computed together in one batched pass."""
        sets = self.adapter_sets
        if not self.cache_features or batch.augmented:
            return self.runtime.chunked(lambda x: self.subspace_features(x, sets), batch.images)
        while len(self._caches) < len(sets):
            self._caches.append(FeatureCache())
        out = [self._caches[j].lookup(batch) if s.frozen else None for j, s in enumerate(sets)]
        missing = [j for j, value in enumerate(out) if value is None]
        if missing:
            fresh = self.runtime.chunked(lambda x: self.subspace_features(x, [sets[j] for j in missing]), batch.images)
            for k, j in enumerate(missing):
                value = fresh[:, k]
                if sets[j].frozen:
                    self._caches[j].store(batch, value)
                out[j] = value
        return torch.stack([v.float() for v in out], dim=1)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------- checkpoints
    def restore(self, state: Mapping[str, Any], sessions_done: int) -> None:
        super().restore(state, sessions_done)
        if len(self.adapters):
            self.adapters[-1].requires_grad_(False)  # its session had ended
            self.proxy_fc.requires_grad_(False)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):
        for cache in self._caches:
            cache.clear()
        return super().load_state_dict(state, strict=strict, assign=assign)
