"""VPT (Visual Prompt Tuning) on an unmodified timm VisionTransformer.

Jia et al., "Visual Prompt Tuning", ECCV 2022; LAMDA-PILOT ``backbone/vpt.py`` (``VPT_ViT``, used by
APER-VPT, RanPAC and FeCAM with a ``_vpt`` backbone). ``P`` learnable tokens join the token sequence
of a frozen ViT, *after* the patch tokens and *without* a position embedding:

* shallow: one set ``p`` ``[P, d]`` enters block 0 and its outputs are carried through all blocks::

      z_0 = [cls + E_0, x_1 + E_1, ..., x_N + E_N, p_1, ..., p_P]
      z_l = Block_l(z_{l-1}),   l = 1..L;   the last P tokens are dropped after block L

* deep: one set ``p^l`` per block; block l reads layer l's fresh prompts in place of the previous
  block's prompt outputs, which are discarded::

      z_l = Block_l([z_{l-1}, p^l])[:, :1+N]

The feature is the ViT's own: the final norm of the ``1+N`` remaining tokens, then the CLS token
(timm ``forward_head(pre_logits=True)``, pooled feature shape unchanged). Attention is permutation
equivariant and the prompts carry no position embedding, so where the prompts sit in the sequence
(the paper's ``[CLS, prompts, patches]`` or PILOT's ``[CLS, patches, prompts]``) does not change any
output; we follow PILOT's order.

Init: PILOT starts the prompts at **zero** (default, ``init="zeros"``); the official VPT code draws
them from U(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + d)) (``init="xavier_uniform"``). Neither
PILOT nor this module applies the paper's prompt dropout.

Attachment. :func:`visual_prompts_active` registers, for the length of a ``with`` block, a forward
pre-hook that appends prompts to the input of a block (every block for deep, block 0 for shallow)
and a forward hook that drops the last ``P`` output tokens (every block for deep, the last block for
shallow); the hooks are removed on exit. The prompts live in :class:`VisualPrompts`, a module the
learner owns; nothing is registered inside the ViT's module tree. Under bf16 autocast the prompts
are cast to the residual stream's dtype.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterator, Literal, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.hooks import RemovableHandle

from pilot.errors import IncompatibleBackboneError

PromptInit = Literal["zeros", "xavier_uniform"]


class VisualPrompts(nn.Module):
    """Prompt tokens ``prompts`` ``[L, P, d]``: L = depth of the ViT (deep) or 1 (shallow).

    The tensor has the shape of PILOT's ``Prompt_Tokens`` for the same setting.
    """

    def __init__(self, layers: int, tokens: int, dim: int, deep: bool, init: PromptInit = "zeros", fan: int = 0):
        super().__init__()
        if tokens < 1:
            raise ValueError(f"VPT needs at least one prompt token, got {tokens}")
        if not deep and layers != 1:
            raise ValueError(f"shallow VPT has one set of prompts, got {layers}")
        self.deep = bool(deep)
        self.prompts = nn.Parameter(torch.zeros(layers, tokens, dim))
        if init == "xavier_uniform":
            bound = math.sqrt(6.0 / float(fan + dim))
            with torch.no_grad():
                nn.init.uniform_(self.prompts, -bound, bound)
        elif init != "zeros":
            raise ValueError(f"unknown prompt init {init!r}: 'zeros' or 'xavier_uniform'")

    @classmethod
    def for_vit(cls, vit: nn.Module, tokens: int, deep: bool, init: PromptInit = "zeros") -> "VisualPrompts":
        """``tokens`` prompts per set, one set per block of ``vit`` if ``deep``, else one set."""
        check_promptable(vit)
        vit = cast(VisionTransformer, vit)
        patch_h, patch_w = _patch_size(vit)
        layers = len(vit.blocks) if deep else 1
        return cls(layers, tokens, int(vit.embed_dim), deep, init, fan=3 * patch_h * patch_w)

    @property
    def num_tokens(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def frozen(self) -> bool:
        return not self.prompts.requires_grad


def _patch_size(vit: VisionTransformer) -> tuple[int, int]:
    size = getattr(vit.patch_embed, "patch_size", (16, 16))
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_promptable(vit: nn.Module) -> None:
    """Raise :class:`IncompatibleBackboneError` unless ``vit`` is a timm VisionTransformer."""
    if not isinstance(vit, VisionTransformer):
        raise IncompatibleBackboneError(
            f"VPT needs a timm VisionTransformer, got {type(vit).__name__}. Choose a ViT backbone, e.g. "
            "backbone=vit_b16_in1k."
        )
    if len(vit.blocks) == 0:
        raise IncompatibleBackboneError("VPT needs a ViT with at least one transformer block")


_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def visual_prompts_active(vit: nn.Module, prompts: VisualPrompts) -> Iterator[None]:
    """Within the ``with`` block, ``vit`` runs with ``prompts`` (see the module doc): its outputs keep
    the plain shapes; gradients reach ``prompts.prompts``. The hooks are removed on exit."""
    check_promptable(vit)
    vit = cast(VisionTransformer, vit)
    depth, count = len(vit.blocks), prompts.num_tokens
    if prompts.prompts.shape[0] != (depth if prompts.deep else 1) or prompts.prompts.shape[2] != vit.embed_dim:
        kind = "deep" if prompts.deep else "shallow"
        raise ValueError(
            f"{kind} prompts of shape {tuple(prompts.prompts.shape)} do not fit a ViT of {depth} blocks of width "
            f"{vit.embed_dim}"
        )
    if getattr(vit, "grad_checkpointing", False):
        # Checkpointed blocks are re-run during backward, after the hooks are gone.
        raise RuntimeError("VPT does not support timm gradient checkpointing; call vit.set_grad_checkpointing(False)")
    if vit in _ACTIVE:
        raise RuntimeError("VPT prompts are already active on this ViT (nested visual_prompts_active)")

    def append(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            p = prompts.prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat([x, p], dim=1), *args[1:])

        return hook

    def drop(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[:, : output.shape[1] - count]

    blocks = list(vit.blocks)
    handles: list[RemovableHandle] = []
    _ACTIVE.add(vit)
    try:
        if prompts.deep:
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(append(layer)))
                handles.append(block.register_forward_hook(drop))
        else:
            handles.append(blocks[0].register_forward_pre_hook(append(0)))
            handles.append(blocks[-1].register_forward_hook(drop))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(vit)
