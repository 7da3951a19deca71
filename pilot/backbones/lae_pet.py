"""LAE's parameter-efficient tuning (PET) modules, attached to an *unmodified* timm ViT through hooks.

Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient Tuning", ICCV 2023;
official code gqk/LAE ``libml/model/pet/`` (placement in ``main.py: attach_pets_vit``), LAMDA-PILOT
``backbone/vit_lae.py`` (docs/methods.md, LAE section). One module per adapted block, of one kind:

* ``prefix`` (:class:`CompensatedPrefix`): ``L`` key and ``L`` value vectors in front of the block's keys
  and values (as :func:`pilot.backbones.prompted_vit.prefix_attention`), each a learnable scalar times
  learnable tokens (tokens U(0, 0.01), scalars 1). With *compensation* the attention weights on the
  prefixes are renormalised to sum to one (the paper's speed calibration for Prefix)::

      a   = softmax(q [s_k P_k; k]^T / sqrt(d_h))            over the L prefixes and the N tokens
      lam = sum_{j < L} a_j
      out = sum_{j < L} (a_j / lam) s_v P_v,j + sum_{j >= L} a_j v_j  =  Attn(q, P) + (1 - lam) Attn(q, k, v)

  Not the identity at initialisation (the tokens are not zero).
* ``adapter`` (:class:`ParallelAdapter`): parallel to the block's attention, on the attention's input
  ``n = norm1(x)``: ``attn(n) + s * up(gelu(down(n)))``; ``down`` d->r Kaiming-uniform(a=sqrt 5), ``up``
  r->d zero, biases zero, ``s`` learnable from 1: the identity at initialisation. (Not the AdaptFormer
  adapter of :mod:`pilot.backbones.adapters`: another place, activation and a learnable scale.)
* ``lora`` (:class:`KVLoRA`): rank-r updates of the key and value rows of ``qkv`` (queries untouched)::

      W_k <- W_k + s_k B_k A_k,   W_v <- W_v + s_v B_v A_v

  ``A`` [r, d] Kaiming-uniform(a=sqrt 5), ``B`` [d, r] zero, ``s`` learnable from 1: the identity at
  initialisation.

Modules belong to the learner (so they are in its ``state_dict``); :func:`pets_attached` installs them
for the length of a ``with`` block and removes every hook and patch on exit.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pilot.backbones.adapters import check_adaptable
from pilot.backbones.prompted_vit import PromptedViT, prefix_attention

PetKind = Literal["prefix", "adapter", "lora"]
Detach = Callable[[], None]


class CompensatedPrefix(nn.Module):
    """Key and value prefixes ``s_k P_k``, ``s_v P_v`` ``[L, C]`` of one block (reference ``Prefix``)."""

    def __init__(self, dim: int, length: int = 10, compensate: bool = True) -> None:
        super().__init__()
        self.key_tokens = nn.Parameter(torch.empty(length, dim).uniform_(0.0, 0.01))
        self.key_scale = nn.Parameter(torch.tensor(1.0))
        self.value_tokens = nn.Parameter(torch.empty(length, dim).uniform_(0.0, 0.01))
        self.value_scale = nn.Parameter(torch.tensor(1.0))
        self.compensate = bool(compensate)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.key_tokens * self.key_scale)[None], (self.value_tokens * self.value_scale)[None]

    def attach(self, block: nn.Module) -> Detach:
        attn: Any = block.attn
        keys, values = self.prefixes()
        # An instance attribute shadows the class's forward for this call only (as prompted_vit.prompting).
        attn.forward = partial(prefix_attention, attn, key_prefix=keys, value_prefix=values, compensate=self.compensate)
        return partial(delattr, attn, "forward")


class ParallelAdapter(nn.Module):
    """``s * up(gelu(down(n)))`` added to the block's attention output (reference ``Adapter``, mode parallel)."""

    def __init__(self, dim: int, bottleneck: int = 5) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.tensor(1.0))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(n))) * self.scale

    def attach(self, block: nn.Module) -> Detach:
        attn: Any = block.attn
        handle = attn.register_forward_hook(lambda _m, args, out: out + self(args[0]))
        return handle.remove


class KVLoRA(nn.Module):
    """Low-rank updates of the key and value projections inside ``qkv`` (reference ``KVLoRA``)."""

    def __init__(self, dim: int, rank: int = 5) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(2, rank, dim))  # [key, value]
        self.lora_b = nn.Parameter(torch.zeros(2, dim, rank))
        self.scale = nn.Parameter(torch.ones(2))
        with torch.no_grad():
            for a in self.lora_a:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change of ``qkv(x)``: ``[0, s_k x A_k^T B_k^T, s_v x A_v^T B_v^T]`` along the last axis."""
        key, value = (self.scale[i] * F.linear(F.linear(x, self.lora_a[i]), self.lora_b[i]) for i in range(2))
        return F.pad(torch.cat([key, value], dim=-1), (key.shape[-1], 0))

    def attach(self, block: nn.Module) -> Detach:
        qkv: Any = getattr(block.attn, "qkv")
        handle = qkv.register_forward_hook(lambda _m, args, out: out + self(args[0]))
        return handle.remove


def build_pets(
    kind: PetKind, dim: int, count: int, length: int = 10, rank: int = 5, compensate: bool = True
) -> nn.ModuleList:
    """``count`` fresh PET modules of ``kind`` for blocks of width ``dim``."""
    if kind == "prefix":
        return nn.ModuleList(CompensatedPrefix(dim, length, compensate) for _ in range(count))
    if kind == "adapter":
        return nn.ModuleList(ParallelAdapter(dim, rank) for _ in range(count))
    if kind == "lora":
        return nn.ModuleList(KVLoRA(dim, rank) for _ in range(count))
    raise ValueError(f"unknown PET kind {kind!r}: use prefix, adapter or lora")


def check_pet_layers(vit: VisionTransformer, kind: PetKind, layers: Sequence[int]) -> None:
    """Raise :class:`pilot.errors.IncompatibleBackboneError` unless the blocks ``layers`` of ``vit`` can take
    PETs of ``kind``: a timm Attention with a fused ``qkv`` (prefix, LoRA), timm pre-norm Blocks (adapter)."""
    if kind == "adapter":
        check_adaptable(vit)
    else:
        PromptedViT(vit, prefix_layers=layers)  # checks the attention modules of these blocks


@contextlib.contextmanager
def pets_attached(vit: VisionTransformer, layers: Sequence[int], pets: nn.ModuleList) -> Iterator[None]:
    """Within the ``with`` block, ``vit`` runs with ``pets[i]`` in block ``layers[i]``; undone on exit."""
    if len(pets) != len(layers):
        raise ValueError(f"{len(pets)} PET modules for {len(layers)} blocks")
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        raise RuntimeError(
            "PET hooks do not support timm gradient checkpointing; call vit.set_grad_checkpointing(False)"
        )
    detach: list[Detach] = []
    try:
        for layer, pet in zip(layers, pets):
            detach.append(pet.attach(vit.blocks[layer]))  # type: ignore[operator]
        yield
    finally:
        for undo in reversed(detach):
            undo()
