"""Prompting an *unmodified* timm VisionTransformer: prompt tokens and attention prefixes.

One layer serves every prompt learner (L2P, DualPrompt, CODA-Prompt), for a timm ViT of any size.
Nothing of the ViT is copied or subclassed: :class:`PromptedViT` runs the model's own
``forward_features`` while two hooks are installed for the duration of that one call:

* **prompt tuning** (L2P, docs/methods.md §1.1): a forward hook on ``vit.patch_drop`` (the module that
  ``forward_features`` calls right after ``_pos_embed``) inserts ``P`` prompt tokens after the prefix
  tokens (CLS, registers), giving ``[CLS, prompts, patches]``. Each prompt token receives the
  pretrained *CLS* position embedding (L2P enlarges the position table by copying the CLS entry to
  the prompt positions); patches keep theirs::

      z_0 = [cls + E_pos[0],  p_1 + E_pos[0], ..., p_P + E_pos[0],  x_1 + E_pos[1], ...]

* **prefix tuning** (DualPrompt §2.1, CODA §3.1): in the chosen blocks, ``attn.forward`` is
  replaced, for that call only, by :func:`prefix_attention`, which uses the block's own projections
  and norms and puts ``L`` extra keys and values in front of the sequence's keys and values
  (queries and sequence length unchanged)::

      Attn(x) = softmax(q [K_p; k]^T / sqrt(d_h)) [V_p; v],   q, k, v = qkv(x)

Both hooks are removed on exit (also on errors), so the backbone outside a prompted call is the
plain timm model, and with no prompts and no prefixes the prompted forward is the timm forward.
The frozen *query* feature of the prompt learners is the unprompted model's pooled pre-logits
feature (:meth:`PromptedViT.query`); for the reference ViTs (``global_pool='token'``) that is the
CLS token after the final LayerNorm.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pilot.errors import IncompatibleBackboneError

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [B or 1, L, attn_dim]
# What prefix_attention reads from a timm Attention module.
_ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def prefix_attention(
    attn: Attention,
    x: torch.Tensor,
    key_prefix: torch.Tensor,
    value_prefix: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    compensate: bool = False,
) -> torch.Tensor:
    """timm ``Attention.forward`` with ``L`` key/value prefixes concatenated in front of the keys and values.

    ``x`` ``[B, N, C]``; ``key_prefix``/``value_prefix`` ``[B or 1, L, H*d_h]`` (split into the
    attention's heads). Uses the module's ``qkv``, ``q_norm``/``k_norm`` (the key norm is applied to
    the prefix keys too, so they live where the token keys live), ``fused_attn`` choice, attention
    dropout, output ``norm``, optional ``gate``, ``proj`` and ``proj_drop``. An ``attn_mask`` over
    the ``N`` keys is extended so that every query sees the prefixes; ``is_causal`` is not defined
    with prefixes. With ``L = 0`` this is exactly ``attn(x)``.

    ``compensate`` (LAE's prefix, :mod:`pilot.backbones.lae_pet`): after the softmax (and the attention
    dropout, as the reference), the weights on the ``L`` prefixes are renormalised to sum to one per head
    and query, ``w_p <- w_p / sum_p w_p``; the weights on the tokens are left as they are.
    """
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    L = key_prefix.shape[1]
    if value_prefix.shape[1] != L:
        raise ValueError(f"key prefix length {L} != value prefix length {value_prefix.shape[1]}")
    if is_causal and L:
        raise ValueError("prefix attention does not support is_causal")
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] each
    pk = key_prefix.to(k.dtype).reshape(key_prefix.shape[0], L, H, D).transpose(1, 2).expand(B, -1, -1, -1)
    pv = value_prefix.to(v.dtype).reshape(value_prefix.shape[0], L, H, D).transpose(1, 2).expand(B, -1, -1, -1)
    k = torch.cat([pk, k], dim=2)
    v = torch.cat([pv, v], dim=2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn_mask is not None and L:
        fill = True if attn_mask.dtype == torch.bool else 0.0
        attn_mask = torch.cat([attn_mask.new_full((*attn_mask.shape[:-1], L), fill), attn_mask], dim=-1)
    if getattr(attn, "fused_attn", False) and not compensate:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if is_causal:
            scores = scores + scores.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        weights = attn.attn_drop(scores.softmax(dim=-1))
        if compensate:
            on_prefix = weights[..., :L]
            weights = torch.cat(
                [on_prefix / on_prefix.sum(dim=-1, keepdim=True).clamp(min=1e-12), weights[..., L:]], -1
            )
        out = weights @ v
    out = out.transpose(1, 2).reshape(B, N, H * D)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prompt_position_embedding(vit: VisionTransformer) -> torch.Tensor:
    """The position embedding prompt tokens receive (L2P's rule): the pretrained CLS entry ``[1, 1, C]``.

    Zero when the ViT has no CLS position (no class token, ``no_embed_class`` or no position table).
    """
    if vit.pos_embed is None or vit.cls_token is None or getattr(vit, "no_embed_class", False):
        return torch.zeros(1, 1, vit.embed_dim, device=next(vit.parameters()).device)
    return vit.pos_embed[:, :1]


def _insert_tokens(vit: VisionTransformer, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` = embedded sequence ``[B, prefix tokens + patches, C]``; returns it with ``tokens``
    (``[B or 1, P, C]``, plus the CLS position embedding) inserted after the prefix tokens."""
    n = vit.num_prefix_tokens
    prompts = (tokens + prompt_position_embedding(vit)).to(x.dtype).expand(x.shape[0], -1, -1)
    prompts = F.dropout(prompts, vit.pos_drop.p, vit.training) if isinstance(vit.pos_drop, nn.Dropout) else prompts
    return torch.cat([x[:, :n], prompts, x[:, n:]], dim=1)


@contextlib.contextmanager
def prompting(
    vit: VisionTransformer, tokens: torch.Tensor | None = None, prefixes: Mapping[int, Prefix] | None = None
) -> Iterator[None]:
    """Within this context, ``vit.forward_features`` inserts ``tokens`` after CLS and runs
    :func:`prefix_attention` with ``prefixes[i]`` in block ``i``. Everything is undone on exit."""
    handles, patched = _install(vit, tokens, prefixes or {})
    try:
        yield
    finally:
        _remove(handles, patched)


# Installing and removing run eagerly, outside any compiled graph (torch.compile cannot replay the
# attribute patching), and each attention module gets one patched forward for good, which reads its
# prefix from the module: compiled code then sees the same forward object at every step (no recompiles).
_PREFIXED_FORWARD: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_PREFIX_ATTRIBUTE = "_pilot_prefix"


def _prefixed_forward(attn: Attention, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    keys, values = getattr(attn, _PREFIX_ATTRIBUTE)
    return prefix_attention(attn, x, keys, values, *args, **kwargs)


@torch.compiler.disable
def _install(
    vit: VisionTransformer, tokens: torch.Tensor | None, prefixes: Mapping[int, Prefix]
) -> tuple[list[Any], list[nn.Module]]:
    handles, patched = [], []
    try:
        if tokens is not None:
            handles.append(vit.patch_drop.register_forward_hook(lambda _m, _i, out: _insert_tokens(vit, tokens, out)))
        for layer, prefix in prefixes.items():
            attn: Any = vit.blocks[layer].attn  # a timm Attention (checked by PromptedViT); forward is patched
            # Instance attributes shadow the class's forward for this call only; the module, its
            # parameters and their names are untouched.
            object.__setattr__(attn, _PREFIX_ATTRIBUTE, prefix)
            attn.forward = _PREFIXED_FORWARD.setdefault(attn, partial(_prefixed_forward, attn))
            patched.append(attn)
    except BaseException:
        _remove(handles, patched)
        raise
    return handles, patched


@torch.compiler.disable
def _remove(handles: list[Any], patched: list[nn.Module]) -> None:
    for handle in handles:
        handle.remove()
    for attn in patched:
        del attn.forward
        object.__delattr__(attn, _PREFIX_ATTRIBUTE)


class PromptedViT:
    """A view of a frozen timm ViT that runs it with prompts. Holds no parameters of its own (the
    ViT belongs to the learner's backbone, the prompts to the learner), so it is not an ``nn.Module``.

    ``prefix_layers``: the blocks that will receive prefixes; their attention modules are checked
    once here (a timm ``Attention``-like module with a fused ``qkv``), so that an incompatible ViT
    variant fails at construction with a clear message.
    """

    def __init__(self, vit: VisionTransformer, prefix_layers: Sequence[int] = ()) -> None:
        if not isinstance(vit, VisionTransformer):
            raise IncompatibleBackboneError(f"prompting needs a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        depth = len(vit.blocks)
        for layer in prefix_layers:
            if not 0 <= layer < depth:
                raise IncompatibleBackboneError(f"prefix layer {layer} does not exist: the ViT has {depth} blocks")
            attn = getattr(vit.blocks[layer], "attn", None)
            missing = [p for p in _ATTENTION_PARTS if not hasattr(attn, p)]
            if attn is None or missing:
                raise IncompatibleBackboneError(
                    f"block {layer} of this ViT ({type(vit.blocks[layer]).__name__}) has no timm Attention with a "
                    f"fused qkv projection (missing {missing or ['attn']}); prefix tuning supports the standard "
                    "timm ViT blocks"
                )
            if attn.num_heads * attn.head_dim != vit.embed_dim:
                raise IncompatibleBackboneError(
                    f"block {layer}: attention width {attn.num_heads * attn.head_dim} != "
                    f"embedding width {vit.embed_dim}; prefixes are embed_dim wide"
                )

    @property
    def dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (CLS and registers); prompt tokens are inserted after them."""
        return int(self.vit.num_prefix_tokens)

    def forward_features(
        self, images: torch.Tensor, tokens: torch.Tensor | None = None, prefixes: Mapping[int, Prefix] | None = None
    ) -> torch.Tensor:
        """All output tokens after the final norm, ``[B, N (+P), C]``, of the prompted ViT."""
        if (
            getattr(self.vit, "grad_checkpointing", False)
            and torch.is_grad_enabled()
            and (tokens is not None or prefixes)
        ):
            # Checkpointed blocks are re-run during backward, after the hooks are gone.
            raise RuntimeError(
                "prompting does not support timm gradient checkpointing; call vit.set_grad_checkpointing(False)"
            )
        with prompting(self.vit, tokens, prefixes):
            return self.vit.forward_features(images)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The ViT's own pooled pre-logits feature of a token sequence (the CLS token after the final
        norm for ``global_pool='token'``, the reference head input of DualPrompt and CODA)."""
        return self.vit.forward_head(features, pre_logits=True)

    def prompt_mean(self, features: torch.Tensor, num_prompts: int) -> torch.Tensor:
        """Mean of the ``num_prompts`` prompt-token outputs after the final norm (L2P's ``head_type=prompt``)."""
        n = self.num_prefix_tokens
        return self.vit.fc_norm(features[:, n : n + num_prompts].mean(dim=1))

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen query feature q(x): the unprompted ViT's pooled feature (CLS after the final norm
        for the reference ViTs), without gradients. Call it once per batch and reuse it."""
        # Compiled steps: the frozen query pass is a graph of its own, so the session-dependent prompt
        # selection that follows it recompiles without recompiling this ViT pass.
        torch._dynamo.graph_break()
        return self.pooled(self.vit.forward_features(images))
