"""Tune the pre-trained model in session 0, then freeze it: the shared first stage of APER, RanPAC and
FeCAM (LAMDA-PILOT ``models/aper_*.py``, ``models/ranpac.py``, ``models/fecam.py``, their ``_init_train``;
docs/methods.md §7).

Session 0 attaches a parameter-efficient module (PET) to the timm model and trains it together with a
cosine head over the session's classes (``CosineLinear``, sigma learnable from 1, rows
U(-1/sqrt(d), 1/sqrt(d)), fresh in every run) with cross-entropy,

    loss = CE(sigma * cos(f_tuned(x), W), y - known)

through :meth:`Learner.train_epochs` (the reference: SGD momentum 0.9 over every trainable tensor,
sigma included, weight decay on all of them; CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per
epoch; these are the config's ``optimizer`` / ``scheduler``). Afterwards the PET (and the head) are
frozen for good: later sessions train nothing, and what the subclass does with the features
(prototypes, ridge regression, Gaussians) happens in its ``end_session`` / ``predict``.

``pet`` (the reference's ``backbone_type`` suffix):

* ``adapter``: one AdaptFormer :class:`~pilot.backbones.adapters.AdapterSet` (width ``adapter_dim``,
  dropout ``adapter_dropout``, scale ``adapter_scale``), attached by hooks (``adapters_active``);
* ``ssf``: :class:`~pilot.backbones.ssf.SSFParams` (per-channel scale/shift after the patch
  projection, norm1, qkv, attn proj, norm2, fc1, fc2 and the final norm), hooks ``ssf_active``;
* ``vpt_shallow`` / ``vpt_deep``: :class:`~pilot.backbones.vpt.VisualPrompts`, ``prompt_tokens``
  zero-initialised tokens after the patch tokens, at the input only / fresh in every block, hooks
  ``visual_prompts_active``;
* ``finetune``: every weight of the model trains. The original stays in ``self.backbone`` (frozen,
  left out of checkpoints, rebuilt from the pretrained weights on resume) and the tuned model is a
  deep copy made at construction, ``self.tuned_backbone`` (in checkpoints), so both exist at once
  (APER's two branches) without a second model definition. Works on any backbone (ViT or CNN).

No ViT is copied for the other PETs: the PET module is registered on the learner (``self.pet``, in
``state_dict``) and is active only inside :meth:`tuned_features`.

API for subclasses (stable)
---------------------------
``pet_kind`` (a class constant) and ``build_pet() -> nn.Module | None``
    each subclass names its PET and builds it on ``self.backbone.vit`` from its own fields (the PET's
    options, e.g. :class:`AdapterTuned`'s ``adapter_dim``); ``finetune`` builds none. Inherited
    hyperparameters: ``prototype_batch_size`` (128) and ``cache_features`` (true).
``tuned_features(images) -> [B, D]``
    the adapted model's pooled feature (CLS after the final norm for a ViT); dropout of the PET follows
    the learner's train/eval mode (pass ``eval_mode=self`` to ``extract_features``).
``pretrained_features(images) -> [B, D]``
    the frozen original model, no PET.
``tuned -> bool``
    True once session 0's training has ended: the PET and head are frozen and ``tuned_features`` is a
    fixed function of the image (cacheable; deterministic in eval mode).
``frozen_features(batch, fn) -> [B, ...]``
    ``fn(batch.images)`` for prediction, cached in ``self.features`` once ``tuned`` (``cache_features``).
``pet_kind``, ``pet`` (module or None), ``tuned_backbone`` (finetune: a :class:`Backbone`, else None),
``first_head`` (session-0 cosine head), ``tuned_parameters()`` (the PET's tensors, or the tuned copy's).
Hooks: ``begin_session`` (session 0: a fresh ``first_head``), ``train_session`` (session 0: the
tuning, then :meth:`freeze_tuned`), ``restore`` (freezes after replaying finished sessions). Subclasses
call ``super()`` in ``begin_session`` and implement ``end_session`` and ``predict``; those that hook
into ViT blocks (every PET but ``finetune``) set ``requires_vit``.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pilot.backbones.adapters import AdapterSet, adapters_active
from pilot.backbones.backbone import Backbone
from pilot.backbones.ssf import SSFParams, ssf_active
from pilot.backbones.vpt import VisualPrompts, visual_prompts_active
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import SessionInfo
from pilot.learners.base import Learner, LearnerSetup
from pilot.modules.classifiers import CosineLinear
from pilot.modules.features import FeatureCache, FeatureFn
from pilot.schema import NonNegativeFloat, PositiveInt, Probability

PetKind = Literal["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"]


class FirstSessionTuned(Learner):
    """Session 0: PET + cosine head trained with CE; afterwards the tuned model is frozen (see the module doc)."""

    pet_kind: ClassVar[PetKind] = "finetune"  # set by each subclass, with build_pet

    prototype_batch_size: PositiveInt = 128
    cache_features: bool = True

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.tuned_backbone: Backbone | None = None
        if self.pet_kind == "finetune":
            self.tuned_backbone = copy.deepcopy(self.backbone)  # before freeze(): the copy trains in session 0
            self.tuned_backbone.requires_grad_(True)
        self.backbone.freeze()
        self.pet = self.build_pet()
        self.first_head = CosineLinear(self.backbone.feature_dim, learn_sigma=True)
        self._tuned = False
        self.features = FeatureCache()

    def build_pet(self) -> nn.Module | None:
        """The PET module on the frozen ViT, from the subclass's options (None: ``finetune``, no module)."""
        return None

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        if info.index == 0:
            head = CosineLinear(self.backbone.feature_dim, learn_sigma=True)
            head.grow(info.num_new, init="uniform")
            self.first_head = head.to(self.backbone_device)

    def train_session(self, session: SessionData) -> None:
        if self._tuned:
            return  # later sessions train nothing
        known = self.known

        def loss_fn(batch: Batch) -> torch.Tensor:
            return F.cross_entropy(self.first_head(self.tuned_features(batch.images)), batch.labels - known)

        self.train_epochs(session, loss_fn, params=[*self.tuned_parameters(), *self.first_head.parameters()])
        self.freeze_tuned()

    # --------------------------------------------------------------------------- features
    def tuned_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the pooled feature of the adapted model (PET active, or the fine-tuned copy)."""
        if self.tuned_backbone is not None:
            return self.tuned_backbone(images)
        with pet_active(self.backbone, self.pet):
            return self.backbone(images)

    def frozen_features(self, batch: Batch, fn: FeatureFn) -> torch.Tensor:
        """``fn(batch.images)`` for prediction: cached per test sample once the tuned model is frozen."""
        if self.cache_features and self._tuned:
            return self.features(batch, fn, self.runtime)
        return self.runtime.chunked(fn, batch.images)

    def pretrained_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: the pooled feature of the frozen original model."""
        return self.backbone(images)

    def tuned_parameters(self) -> list[nn.Parameter]:
        """The tensors session 0 tunes besides the head: the PET's, or every weight of the tuned copy."""
        module = self.tuned_backbone if self.tuned_backbone is not None else self.pet
        return list(module.parameters()) if module is not None else []

    @property
    def tuned(self) -> bool:
        """Session 0's training has ended: the tuned model and the head are frozen."""
        return self._tuned

    @property
    def backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def freeze_tuned(self) -> None:
        """Freeze the PET (or the tuned copy, kept in eval mode for good) and the session-0 head."""
        if self.tuned_backbone is not None:
            self.tuned_backbone.freeze()
        if self.pet is not None:
            self.pet.requires_grad_(False)
        self.first_head.requires_grad_(False)
        self._tuned = True

    # ------------------------------------------------------------------------- checkpoints
    def restore(self, state: Mapping[str, Any], sessions_done: int) -> None:
        super().restore(state, sessions_done)
        if sessions_done > 0:
            self.freeze_tuned()

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False):
        self.features.clear()
        return super().load_state_dict(state, strict=strict, assign=assign)


class AdapterTuned(FirstSessionTuned):
    """:class:`FirstSessionTuned` with one AdaptFormer adapter set (FeCAM, RanPAC: width, dropout, scale)."""

    requires_vit = True
    pet_kind = "adapter"

    adapter_dim: PositiveInt = 64
    adapter_dropout: Probability = 0.1
    adapter_scale: NonNegativeFloat = 0.1

    def build_pet(self) -> nn.Module:
        return AdapterSet.for_vit(self.backbone.vit, self.adapter_dim, self.adapter_dropout, self.adapter_scale)


# ---------------------------------------------------------------------------------- PET modules
def pet_active(backbone: Backbone, pet: nn.Module | None) -> AbstractContextManager[Any]:
    """A context in which ``backbone(images)`` runs with ``pet`` attached to its (unmodified) ViT."""
    if isinstance(pet, AdapterSet):
        return adapters_active(backbone.vit, [pet])
    if isinstance(pet, SSFParams):
        return ssf_active(backbone.vit, pet)
    if isinstance(pet, VisualPrompts):
        return visual_prompts_active(backbone.vit, pet)
    return nullcontext()
