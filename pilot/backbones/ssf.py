"""SSF (Scaling & Shifting your Features) on an unmodified timm VisionTransformer.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
NeurIPS 2022; LAMDA-PILOT ``backbone/vit_ssf.py`` (used by APER-SSF, RanPAC and FeCAM with an
``_ssf`` backbone). A per-channel affine map follows selected operations of the frozen ViT::

    y = gamma * x + beta,   gamma ~ N(1, 0.02^2),  beta ~ N(0, 0.02^2)   (one pair per site)

The sites are those of PILOT's SSF ViT (docs/methods.md §7, APER-SSF):

* ``patch_embed``: the patch projection output (per embedding channel), before the position
  embedding; plus ``patch_embed_norm`` after ``patch_embed.norm`` when the ViT has one (PILOT's rule
  for an embedding norm; timm's ViT-B/16 has none);
* in every block: the outputs of ``norm1``, ``attn.qkv`` (3*d channels, before the split into
  q, k, v), ``attn.proj``, ``norm2``, ``mlp.fc1`` (before the activation) and ``mlp.fc2``;
* ``norm``: the final norm output (so the CLS feature is ``gamma * LN(z_L)[0] + beta``).

ViT-B/16: 1 + 12*6 + 1 = 74 (gamma, beta) pairs, 2 * (768 + 12 * (768*(1+3+1+1+4+1)) + 768)
= 205,824 parameters. Nothing else trains.

Attachment. :func:`ssf_active` registers one forward hook per site on the timm submodules for the
length of a ``with`` block and removes them on exit (also on errors); outside it the ViT is the
plain pretrained model. The parameters live in :class:`SSFParams`, a module the learner owns
(it is in the learner's ``state_dict``; nothing is registered inside the ViT's module tree). Under
bf16 autocast the (fp32) gamma and beta are cast to the hooked output's dtype, so the network's
dtypes are the plain network's; gradients reach the fp32 parameters through the cast.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, cast

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.hooks import RemovableHandle

from pilot.errors import IncompatibleBackboneError

# SSF site name in a block -> the timm submodule whose output it scales and shifts.
BLOCK_SITES = {
    "norm1": "norm1",
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


class ScaleShift(nn.Module):
    """``y = scale * x + shift`` along one channel dimension (last by default; 1 for ``[B, C, H, W]``)."""

    def __init__(self, channels: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))
        self.shift = nn.Parameter(torch.empty(channels))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02) -> None:
        """SSF's init: scale ~ N(1, std^2), shift ~ N(0, std^2) (std 0.02 in the paper and PILOT)."""
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    @torch.no_grad()
    def set_identity(self) -> "ScaleShift":
        self.scale.fill_(1.0)
        self.shift.zero_()
        return self

    def forward(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return x * self.scale.to(x.dtype).view(shape) + self.shift.to(x.dtype).view(shape)


class BlockSSF(nn.Module):
    """The six (scale, shift) pairs of one transformer block, named after the timm module they follow."""

    def __init__(self, dim: int, qkv_dim: int, proj_dim: int, hidden_dim: int, out_dim: int, init_std: float) -> None:
        super().__init__()
        self.norm1 = ScaleShift(dim, init_std)
        self.qkv = ScaleShift(qkv_dim, init_std)
        self.proj = ScaleShift(proj_dim, init_std)
        self.norm2 = ScaleShift(dim, init_std)
        self.fc1 = ScaleShift(hidden_dim, init_std)
        self.fc2 = ScaleShift(out_dim, init_std)


class SSFParams(nn.Module):
    """All SSF parameters of one ViT: ``patch_embed``, ``blocks[i].<site>`` (:data:`BLOCK_SITES`),
    ``norm`` and, for a ViT with a patch-embedding norm, ``patch_embed_norm``. Build it with
    :meth:`for_vit`; it is the unit a learner trains, freezes and checkpoints."""

    def __init__(
        self,
        patch_embed: ScaleShift,
        blocks: list[BlockSSF],
        norm: ScaleShift,
        patch_embed_norm: ScaleShift | None = None,
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.patch_embed_norm = patch_embed_norm
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm

    @classmethod
    def for_vit(cls, vit: nn.Module, init_std: float = 0.02) -> "SSFParams":
        """SSF parameters sized for ``vit`` (any timm VisionTransformer with standard blocks), drawn
        from SSF's init with standard deviation ``init_std``."""
        check_ssf_adaptable(vit)
        vit = cast(VisionTransformer, vit)
        dim = int(vit.embed_dim)
        blocks = []
        for block in vit.blocks:
            width = {site: _site_channels(module, vit) for site, module in _block_sites(block).items()}
            blocks.append(BlockSSF(dim, width["qkv"], width["proj"], width["fc1"], width["fc2"], init_std))
        embed_norm = ScaleShift(dim, init_std) if _has_embed_norm(vit) else None
        return cls(ScaleShift(dim, init_std), blocks, ScaleShift(dim, init_std), embed_norm)

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, index: int) -> BlockSSF:
        return cast(BlockSSF, self.blocks[index])

    @torch.no_grad()
    def set_identity(self) -> "SSFParams":
        """scale = 1, shift = 0 everywhere: the SSF ViT then computes exactly the plain ViT."""
        for module in self.modules():
            if isinstance(module, ScaleShift):
                module.set_identity()
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())


def _has_embed_norm(vit: VisionTransformer) -> bool:
    return not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity)


def check_ssf_adaptable(vit: nn.Module) -> None:
    """Raise :class:`IncompatibleBackboneError` unless ``vit`` is a timm VisionTransformer with a
    convolutional patch projection and pre-norm ``Block``s whose attention has a fused ``qkv`` Linear
    and ``proj`` Linear and whose MLP has ``fc1``/``fc2`` Linears (the sites SSF follows)."""
    if not isinstance(vit, VisionTransformer):
        raise IncompatibleBackboneError(f"SSF needs a timm VisionTransformer, got {type(vit).__name__}")
    if not isinstance(getattr(vit.patch_embed, "proj", None), nn.Conv2d):
        raise IncompatibleBackboneError("SSF follows the ViT's patch projection: patch_embed.proj must be a Conv2d")
    for i, block in enumerate(vit.blocks):
        sites = {site: _find(block, path) for site, path in BLOCK_SITES.items()}
        missing = [BLOCK_SITES[s] for s in ("qkv", "proj", "fc1", "fc2") if not isinstance(sites[s], nn.Linear)]
        missing += [BLOCK_SITES[s] for s in ("norm1", "norm2") if sites[s] is None]
        if not isinstance(block, Block) or missing:
            raise IncompatibleBackboneError(
                f"SSF hooks timm's pre-norm vision_transformer.Block with norm1, norm2 and Linear attn.qkv, attn.proj, "
                f"mlp.fc1, mlp.fc2; block {i} is a {type(block).__name__}"
                + (f" without {', '.join(missing)}" if missing else "")
                + ". Choose a standard ViT backbone, e.g. backbone=vit_b16_in1k."
            )


def _find(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _block_sites(block: nn.Module) -> dict[str, nn.Module]:
    """SSF site name -> timm submodule of one (checked) block."""
    return {site: block.get_submodule(path) for site, path in BLOCK_SITES.items()}


def ssf_sites(vit: VisionTransformer, params: SSFParams) -> list[tuple[str, nn.Module, ScaleShift, int]]:
    """``(timm module name, module, its ScaleShift, channel dim)`` for every SSF site of ``vit``."""
    sites: list[tuple[str, nn.Module, ScaleShift, int]] = [
        ("patch_embed.proj", vit.patch_embed.get_submodule("proj"), params.patch_embed, 1)  # conv output [B, C, H, W]
    ]
    if params.patch_embed_norm is not None:
        sites.append(("patch_embed.norm", vit.patch_embed.get_submodule("norm"), params.patch_embed_norm, -1))
    for i, block in enumerate(vit.blocks):
        block_params = params.block(i)
        for site, module in _block_sites(block).items():
            sites.append((f"blocks.{i}.{BLOCK_SITES[site]}", module, getattr(block_params, site), -1))
    sites.append(("norm", vit.norm, params.norm, -1))
    return sites


_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def ssf_active(vit: nn.Module, params: SSFParams) -> Iterator[None]:
    """Within the ``with`` block, every SSF site of ``vit`` is followed by its (scale, shift) from
    ``params``; the hooks are removed on exit. Gradients reach ``params`` (not the frozen ViT)."""
    check_ssf_adaptable(vit)
    vit = cast(VisionTransformer, vit)
    if len(params) != len(vit.blocks) or (params.patch_embed_norm is not None) != _has_embed_norm(vit):
        raise ValueError(f"SSF parameters for {len(params)} blocks do not fit this ViT ({len(vit.blocks)} blocks)")
    if getattr(vit, "grad_checkpointing", False):
        # Checkpointed blocks are re-run during backward, after the hooks are gone.
        raise RuntimeError("SSF does not support timm gradient checkpointing; call vit.set_grad_checkpointing(False)")
    if vit in _ACTIVE:
        raise RuntimeError("SSF is already active on this ViT (nested ssf_active)")
    sites = ssf_sites(vit, params)
    for name, module, scale_shift, dim in sites:
        channels = _site_channels(module, vit)
        if scale_shift.scale.numel() != channels:
            raise ValueError(f"SSF site {name}: {scale_shift.scale.numel()} parameters for {channels} channels")

    def hook(scale_shift: ScaleShift, dim: int) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        return lambda _module, _args, output: scale_shift(output, dim)

    handles: list[RemovableHandle] = []
    _ACTIVE.add(vit)
    try:
        for _name, module, scale_shift, dim in sites:
            handles.append(module.register_forward_hook(hook(scale_shift, dim)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(vit)


def _site_channels(module: nn.Module, vit: VisionTransformer) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    return int(module.out_features) if isinstance(module, nn.Linear) else int(vit.embed_dim)
