"""MEMO (Zhou, Wang, Ye, Zhan, "A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental
Learning", ICLR 2023), as LAMDA-PILOT runs it on a ViT (``models/memo.py``, ``utils/inc_net.py``
``AdaptiveNet``, ``backbone/vit_memo.py``, ``exps/memo.json``, ``memo_inr.json``; docs/methods.md, MEMO).

The ViT is split after block ``L - k`` (PILOT: k = 1 of 12). Its *generalised* part g (patch embedding,
tokens, blocks ``0..L-k-1``) is shared; session T adds a *specialised* extractor s_T (the last k blocks,
the final norm and the CLS pooling): a copy of s_{T-1} as trained, or in session 0 the ViT's last
blocks (``specialized_init``). DER's network and losses (:mod:`pilot.modules.growing`, :class:`DER`) on
``phi(x) = [s_0(g(x)); ...; s_T(g(x))]``:

    L = CE(W phi(x) + b, y) + alpha_aux CE(W_aux s_T(g(x)) + b_aux, y_aux)     (session 0: CE alone)

Session 0 trains g, s_0 and the classifier; afterwards g is frozen (unless ``train_base``) and so are the
older s_t (unless ``train_adaptive``), PILOT's ``after_task`` / ``incremental_train``. Replay, herding on
``phi`` and NME as DER. The split reuses the timm model's own blocks (slices of ``vit.blocks``, copies
of its last blocks): no model code.

PILOT pitfall (``specialized_init``): ``vit_memo.Specialized_Vit`` holds its block in a new attribute
``last_block``, which timm 0.6's npz loader never fills: PILOT's s_0 starts from PyTorch's default init
(``random``), not from the pre-trained block 11 it was meant to copy (``pretrained``, our default;
``experiment=pilot_reference`` sets ``random``). Memory: k blocks per session (ViT-B/16, k = 1: 7.1 M
parameters, 28 MB), where PILOT's ``Specialized_Vit`` also keeps an unused full 12-block ViT per session.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Mapping

import torch
from torch import nn

from pilot.backbones.backbone import Backbone
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import IncompatibleBackboneError
from pilot.learners.base import LearnerSetup
from pilot.learners.der import DER
from pilot.modules.growing import freeze
from pilot.registry import register_learner
from pilot.schema import PositiveInt


def reset_to_default_init(module: nn.Module) -> nn.Module:
    """PyTorch's default init for every layer of ``module`` (``nn.Linear``: Kaiming-uniform a=sqrt(5), bias
    U(+-1/sqrt(fan_in)); LayerNorm: 1, 0): what PILOT's never-loaded ``last_block`` holds."""
    for layer in module.modules():
        reset = getattr(layer, "reset_parameters", None)
        if layer is not module and callable(reset):
            reset()
    return module


@register_learner("memo")
class MEMO(DER):
    """A shared generalised ViT trunk and one specialised copy of the last blocks per session."""

    requires_vit = True

    specialized_blocks: PositiveInt = 1
    specialized_init: Literal["pretrained", "random"] = "pretrained"
    train_base: bool = False
    train_adaptive: bool = False

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        vit = self.backbone.vit
        self.split = len(vit.blocks) - self.specialized_blocks
        # The trunk's last blocks and final norm are the source of s_0 only: never trained in place.
        vit.blocks[self.split :].requires_grad_(False)
        vit.norm.requires_grad_(False)

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        super().check_requirements(backbone, scenario, params)
        depth, k = backbone.depth, int(params["specialized_blocks"])
        if depth is not None and k >= depth:
            raise IncompatibleBackboneError(
                f"method.specialized_blocks={k} leaves no shared block: backbone {backbone.name} has {depth} "
                f"transformer blocks. Choose 1..{depth - 1} (PILOT: 1)."
            )

    # ---------------------------------------------------------------------------- structure
    def extractors(self) -> list[nn.Module]:
        return list(self.grown)  # s_0, ..., s_T

    def new_extractor(self, info: SessionInfo) -> nn.Module:
        if info.index > 0:
            return copy.deepcopy(self.grown[-1])
        vit = self.backbone.vit
        blocks = copy.deepcopy(vit.blocks[self.split :])
        if self.specialized_init == "random":
            reset_to_default_init(blocks)
        return nn.Sequential(*blocks, copy.deepcopy(vit.norm))

    def set_trainable(self, info: SessionInfo) -> None:
        if info.index == 0:
            return  # session 0: the trunk and s_0 both train
        if not self.train_base:
            freeze(self.backbone)
        for specialized in self.grown[:-1]:
            specialized.requires_grad_(self.train_adaptive)

    # ----------------------------------------------------------------------------- forward
    def shared_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """g(x): the token map after the generalised blocks (timm's ``forward_features`` up to the split)."""
        vit = self.backbone.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        return vit.blocks[: self.split](x)

    def extractor_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.shared_tokens(images)
        pool = self.backbone.vit.forward_head  # CLS token (fc_norm, head: identities for ViT-B/16)
        return [pool(specialized(tokens), pre_logits=True) for specialized in self.grown]
