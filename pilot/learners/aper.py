"""APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024; a.k.a. ADAM), as in LAMDA-PILOT ``models/aper_adapter.py``,
``aper_ssf.py``, ``aper_vpt.py``, ``aper_finetune.py`` and ``MultiBranchCosineIncrementalNet`` in
``utils/inc_net.py`` (docs/methods.md §7).

Session 0 tunes the pre-trained model with a parameter-efficient module (or fully) and a cosine head
(:mod:`pilot.learners.first_session`). Then the network has two frozen branches, the original model
and the adapted one, whose pooled (CLS) features are concatenated, original first:

    g(x) = [f_pre(x) ; f_tuned(x)]                               (2 * D numbers)

The classifier is a cosine classifier (sigma = 1, never trained) whose row for class c is the
unnormalised class mean of g over the class's training images under the test transform, written at the
end of every session, session 0 included ("replace_fc" after ``construct_dual_branch_network``):

    mu_c = mean_{x in X_c} g(x),     logit_c(x) = cos(g(x), mu_c)

Both branches are fixed after session 0, so the features of test images are cached across sessions.
Five registered names, one per PET: ``aper_adapter``, ``aper_ssf``, ``aper_vpt_shallow``,
``aper_vpt_deep``, ``aper_finetune``.

How the five names share one class: :class:`APER` adds no hyperparameter; every variant inherits
:class:`~pilot.learners.first_session.FirstSessionTuned`'s (``prototype_batch_size``, ``cache_features``)
and the training settings, and declares only its PET: ``pet_kind`` and ``build_pet``, with the PET's
options as fields (``prompt_tokens``; SSF and the fine-tuned copy have none). ``aper_adapter`` takes the
adapter and its options from :class:`~pilot.learners.first_session.AdapterTuned` (as FeCAM and RanPAC do),
listed first among its bases. Each name's config keys are therefore exactly these fields.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pilot.backbones.ssf import SSFParams
from pilot.backbones.vpt import VisualPrompts
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import LearnerSetup
from pilot.learners.first_session import AdapterTuned, FirstSessionTuned, PetKind
from pilot.modules.classifiers import CosineLinear, class_means
from pilot.modules.feature_store import FeatureStore
from pilot.registry import register_learner
from pilot.schema import PositiveInt


class APER(FirstSessionTuned):
    """Two frozen branches [pretrained ; tuned] after session 0, cosine prototype classifier."""

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        # Rows are written, never trained, and sigma stays 1 (reference: a fresh CosineLinear whose
        # sigma no optimiser sees after session 0).
        self.head = CosineLinear(2 * self.backbone.feature_dim, learn_sigma=False).requires_grad_(False)
        # The pretrained branch never changes: its features are kept on disk for the sweep, under the same key
        # as SimpleCIL's (modules/feature_store.py; pretrained weights only), and in memory otherwise.
        self.pretrained = FeatureStore(self.runtime, "backbone/pooled")

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.head.grow(info.total, init="zeros")

    def end_session(self, session: SessionData) -> None:
        info, size = session.info, self.prototype_batch_size
        # eval_mode: PET dropout off (reference replace_fc: model.eval())
        if self.pretrained.on_disk:  # two passes: the pretrained one mostly reads the store
            pre, labels = self.class_features(
                session, self.pretrained_features, size, "prototypes", cache=self.pretrained
            )
            tuned, _ = self.class_features(session, self.tuned_features, size, "prototypes", eval_mode=self)
            feats = torch.cat([pre, tuned], dim=1)
        else:
            feats, labels = self.class_features(session, self.branch_features, size, "prototypes", eval_mode=self)
        self.head.assign(info.new_classes, class_means(feats, labels, info.new_classes))

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        with self.runtime.autocast():
            pre = self.pretrained(batch, self.pretrained_features, self.runtime)
            feats = torch.cat([pre, self.frozen_features(batch, self.tuned_features)], dim=1)
        return self.head(feats)

    def branch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 2D]``: [pretrained ; tuned] pooled features (reference order: the original branch first)."""
        return torch.cat([self.pretrained_features(images), self.tuned_features(images)], dim=1)


# ------------------------------------------------------------------------------ the five names
@register_learner("aper_adapter")
class AperAdapter(AdapterTuned, APER):
    """APER with one AdaptFormer adapter set (exps/aper_aperpter.json, _inr.json): AdapterTuned's PET and options."""


@register_learner("aper_ssf")
class AperSSF(APER):
    """APER with SSF scale and shift (exps/aper_ssf.json, _inr.json)."""

    requires_vit = True
    pet_kind = "ssf"

    def build_pet(self) -> nn.Module:
        return SSFParams.for_vit(self.backbone.vit)


@register_learner("aper_vpt_shallow")
class AperVPTShallow(APER):
    """APER with VPT-Shallow prompt tokens at the input (exps/aper_vpt_shallow.json; ImageNet-R: see the config)."""

    requires_vit = True
    pet_kind: ClassVar[PetKind] = "vpt_shallow"

    prompt_tokens: PositiveInt = 5

    def build_pet(self) -> nn.Module:  # zero init, as PILOT
        return VisualPrompts.for_vit(self.backbone.vit, self.prompt_tokens, deep=self.pet_kind == "vpt_deep")


@register_learner("aper_vpt_deep")
class AperVPTDeep(AperVPTShallow):
    """APER with VPT-Deep prompt tokens in every block (exps/aper_vpt_deep.json, _inr.json)."""

    pet_kind = "vpt_deep"


@register_learner("aper_finetune")
class AperFinetune(APER):
    """APER with the whole model fine-tuned in session 0 (exps/aper_finetune.json, _inr.json); any backbone."""

    pet_kind = "finetune"
