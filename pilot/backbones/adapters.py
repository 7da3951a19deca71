"""AdaptFormer adapters on an unmodified timm VisionTransformer (docs/methods.md §0.5).

One :class:`Adapter` per transformer block, parallel to the MLP and fed with the residual stream
``h`` after the attention sub-block (the input of ``norm2``)::

    h   = x + drop_path1(ls1(attn(norm1(x))))
    out = h + drop_path2(ls2(mlp(norm2(h)))) + scale * up(dropout(relu(down(h))))

with ``scale`` = 0.1 fixed, dropout 0.1 (train mode only), ``down`` d->r Kaiming-uniform(a=sqrt 5),
``up`` r->d zero, both biases zero, so a fresh adapter leaves the network unchanged. As in the
reference (PILOT ``backbone/vit_ease.py``, AdaptFormer), the adapter output is added outside the
MLP branch's LayerScale and DropPath: they scale the MLP only.

Attachment. The ViT is never copied or edited. :func:`adapters_active` registers, for the length
of a ``with`` block, three kinds of hooks on the timm modules and removes them on exit:

* a forward pre-hook on every block's ``norm2`` keeps its input ``h``;
* a forward hook on every block adds the adapter branch of ``h`` to the block output;
* with K > 1 adapter sets, a forward pre-hook on the first block repeats the token batch K times
  (``[K*B, N, d]``, chunk k for set k). Patch embedding runs once; every block then processes
  the K copies in one call through the shared frozen weights, and the K adapters of a block run as
  two batched matmuls (``baddbmm`` over stacked weights). ``backbone(images)`` returns
  ``[K*B, d]``; :func:`multi_adapter_features` reshapes it to ``[B, K, d]``.

Outside the ``with`` block ``backbone(images)`` is the plain pretrained ViT.

Cost. K adapter sets cost K transformer passes in FLOPs (the shared patch embedding is computed
once), plus the adapters: 2*N*d*r MACs per block and set, 1.3 % of a ViT-B/16 block at r=64
(196+1 tokens). With EASE after 10 sessions (K = 10) one forward of B images therefore costs
about 10.07x the FLOPs of a plain ViT-B/16 pass of those images, in one batched pass of 10*B
samples per block (12 block calls, not 120) with activations for 10*B samples. EASE keeps the
per-sample cost lower still by caching the features of frozen adapter sets on test images
(see :mod:`pilot.learners.ease`).

Adapter sets are ordinary modules: learners keep them in an ``nn.ModuleList`` of their own, so
they are in ``state_dict()`` (the frozen backbone is not).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pilot.errors import IncompatibleBackboneError


class Adapter(nn.Module):
    """AdaptFormer bottleneck ``scale * up(dropout(relu(down(h))))`` (no LayerNorm, no residual)."""

    def __init__(self, dim: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = float(dropout)
        self.scale = float(scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference "lora" init: down Kaiming-uniform(a=sqrt 5), up and both biases zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.dropout(F.relu(self.down(h)), p=self.dropout, training=self.training)
        return self.up(z) * self.scale


class AdapterSet(nn.Module):
    """One :class:`Adapter` per transformer block: the unit a learner trains, freezes and selects."""

    def __init__(self, depth: int, dim: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(Adapter(dim, bottleneck, dropout, scale) for _ in range(depth))

    @classmethod
    def for_vit(
        cls, vit: VisionTransformer, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1
    ) -> "AdapterSet":
        check_adaptable(vit)
        return cls(len(vit.blocks), int(vit.embed_dim), bottleneck, dropout, scale)

    def __len__(self) -> int:
        return len(self.adapters)

    def __getitem__(self, index: int) -> Adapter:
        return self.adapters[index]  # type: ignore[return-value]

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())


def check_adaptable(vit: nn.Module) -> None:
    """Raise :class:`IncompatibleBackboneError` unless ``vit`` is a timm VisionTransformer whose blocks
    are pre-norm ``timm...Block``s (``norm2`` then ``mlp`` on the residual stream)."""
    if not isinstance(vit, VisionTransformer):
        raise IncompatibleBackboneError(f"adapters need a timm VisionTransformer, got {type(vit).__name__}")
    for i, block in enumerate(vit.blocks):
        if not isinstance(block, Block):
            raise IncompatibleBackboneError(
                f"adapters hook timm's pre-norm vision_transformer.Block (norm2 -> mlp on the residual stream); "
                f"block {i} of this ViT is a {type(block).__name__}. Choose a standard ViT backbone, e.g. "
                "backbone=vit_b16_in1k."
            )


def parallel_adapters(h: torch.Tensor, adapters: Sequence[Adapter]) -> torch.Tensor:
    """Adapter branch for ``h`` = ``[K*B, N, d]`` whose chunk k (along the batch) belongs to ``adapters[k]``.

    K = 1 is a plain call. For K > 1 the K adapters run as two batched matmuls over stacked
    weights; they must share dropout, scale and train/eval mode.
    """
    if len(adapters) == 1:
        return adapters[0](h)
    first = adapters[0]
    if any(a.training != first.training or a.dropout != first.dropout or a.scale != first.scale for a in adapters):
        raise ValueError("adapter sets evaluated in one batched pass must share train/eval mode, dropout and scale")
    k = len(adapters)
    x = h.reshape(k, -1, h.shape[-1])  # [K, B*N, d]
    w_down = torch.stack([a.down.weight for a in adapters]).transpose(1, 2)  # [K, d, r]
    b_down = torch.stack([a.down.bias for a in adapters]).unsqueeze(1)  # [K, 1, r]
    w_up = torch.stack([a.up.weight for a in adapters]).transpose(1, 2)  # [K, r, d]
    b_up = torch.stack([a.up.bias for a in adapters]).unsqueeze(1)  # [K, 1, d]
    z = F.dropout(F.relu(torch.baddbmm(b_down, x, w_down)), p=first.dropout, training=first.training)
    return (torch.baddbmm(b_up, z, w_up) * first.scale).reshape(h.shape)


_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def adapters_active(vit: VisionTransformer, sets: Sequence[AdapterSet]) -> Iterator[int]:
    """Within the ``with`` block, ``vit`` runs once per adapter set in ``sets`` (see the module doc).

    Yields K = ``len(sets)``: the output batch of ``vit`` is K times the input batch, set-major.
    """
    if not sets:
        raise ValueError("adapters_active needs at least one adapter set")
    check_adaptable(vit)
    depth = len(vit.blocks)
    if any(len(s) != depth for s in sets):
        raise ValueError(f"adapter sets of {[len(s) for s in sets]} adapters for a ViT of {depth} blocks")
    if vit in _ACTIVE:
        raise RuntimeError("adapters are already active on this ViT (nested adapters_active)")
    k = len(sets)
    handles = []

    def repeat_tokens(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].repeat(k, 1, 1), *args[1:])

    def attach(index: int, block: Block) -> None:
        adapters = [s[index] for s in sets]
        kept: list[torch.Tensor] = []

        def keep_residual(_module: nn.Module, args: tuple) -> None:
            kept.append(args[0])

        def add_branch(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + parallel_adapters(kept.pop(), adapters)

        handles.append(block.norm2.register_forward_pre_hook(keep_residual))
        handles.append(block.register_forward_hook(add_branch))

    _ACTIVE.add(vit)
    try:
        if k > 1:
            handles.append(vit.blocks[0].register_forward_pre_hook(repeat_tokens))
        for index, block in enumerate(vit.blocks):
            attach(index, cast(Block, block))  # check_adaptable: timm Blocks
        yield k
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(vit)


def multi_adapter_features(
    backbone: nn.Module, vit: VisionTransformer, images: torch.Tensor, sets: Sequence[AdapterSet]
) -> torch.Tensor:
    """Pooled features of ``backbone(images)`` under each adapter set: ``[B, K, d]`` in one batched pass."""
    with adapters_active(vit, sets) as k:
        out = backbone(images)
    return out.reshape(k, images.shape[0], -1).transpose(0, 1)
