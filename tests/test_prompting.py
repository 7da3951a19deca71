"""The prompting layer on an unmodified timm ViT: prefix attention, prompt tokens, no leftovers."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pilot.backbones.prompted_vit import PromptedViT, prefix_attention, prompt_position_embedding
from pilot.errors import IncompatibleBackboneError


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=0, **kwargs)
    with torch.no_grad():  # a non-trivial CLS position so that the position rule is visible
        vit.pos_embed.normal_(std=1.0)
    return vit.eval()


def plain_attention(attn: Attention, x: torch.Tensor, fused: bool) -> torch.Tensor:
    attn.fused_attn = fused
    return attn(x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_prefix_attention_with_empty_prefixes_is_plain_attention(fused, qk_norm):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    attn.fused_attn = fused
    x = torch.randn(3, 7, 24)
    empty = torch.zeros(1, 0, 24)
    torch.testing.assert_close(
        prefix_attention(attn, x, empty, empty), plain_attention(attn, x, fused), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_prefixes_act_as_extra_keys_and_values(fused, qk_norm):
    """Prefixes equal to the keys/values of L extra tokens z give exactly plain attention over
    [z; x] at the positions of x (queries and sequence length of x unchanged)."""
    torch.manual_seed(1)
    attn = Attention(24, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    attn.fused_attn = fused
    x, z = torch.randn(3, 7, 24), torch.randn(3, 4, 24)
    _, k_z, v_z = attn.qkv(z).chunk(3, dim=-1)  # [B, L, C] each, heads along C as timm lays them out
    out = prefix_attention(attn, x, k_z, v_z)
    assert out.shape == (3, 7, 24)
    torch.testing.assert_close(out, plain_attention(attn, torch.cat([z, x], 1), fused)[:, 4:], rtol=1e-5, atol=1e-5)
    # A batch-shared prefix [1, L, C] broadcasts over the batch.
    shared = prefix_attention(attn, x, k_z[:1], v_z[:1])
    torch.testing.assert_close(shared[0], out[0])
    # A boolean mask over the N keys is extended so that the prefixes stay visible.
    mask = torch.ones(7, 7, dtype=torch.bool)
    torch.testing.assert_close(prefix_attention(attn, x, k_z, v_z, attn_mask=mask), out, rtol=1e-5, atol=1e-5)


def test_prompted_vit_without_prompts_is_the_timm_forward():
    vit = tiny_vit()
    prompted = PromptedViT(vit, prefix_layers=[0, 1, 2])
    x = torch.rand(2, 3, 16, 16)
    plain = vit.forward_features(x)
    torch.testing.assert_close(prompted.forward_features(x), plain, rtol=0, atol=0)
    empty = torch.zeros(1, 0, 24)
    torch.testing.assert_close(
        prompted.forward_features(x, tokens=empty, prefixes={i: (empty, empty) for i in range(3)}),
        plain,
        rtol=0,
        atol=1e-6,
    )
    # The query feature = the CLS token after the final norm = the backbone's output.
    torch.testing.assert_close(prompted.query(x), plain[:, 0])
    torch.testing.assert_close(prompted.query(x), vit(x))


def test_prompting_leaves_no_hooks_behind():
    vit = tiny_vit()
    prompted = PromptedViT(vit, prefix_layers=[1])
    x = torch.rand(2, 3, 16, 16)
    before = vit(x)
    prefix = torch.randn(1, 3, 24)
    out = prompted.forward_features(x, tokens=torch.randn(1, 2, 24), prefixes={1: (prefix, prefix)})
    assert out.shape == (2, 1 + 2 + 4, 24)  # CLS, 2 prompts, 4 patches; prefixes add no tokens
    assert "forward" not in vit.blocks[1].attn.__dict__ and not vit.patch_drop._forward_hooks
    torch.testing.assert_close(vit(x), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):  # undone on errors too
        _raise_inside(prompted, x, prefix)
    assert "forward" not in vit.blocks[1].attn.__dict__ and not vit.patch_drop._forward_hooks


def _raise_inside(prompted: PromptedViT, x: torch.Tensor, prefix: torch.Tensor) -> None:
    handle = prompted.vit.blocks[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        prompted.forward_features(x, tokens=torch.randn(1, 2, 24), prefixes={1: (prefix, prefix)})
    finally:
        handle.remove()


def test_prompt_tokens_receive_the_cls_position_embedding():
    """L2P's rule: [CLS + E_0, p_1 + E_0, ..., p_P + E_0, x_1 + E_1, ...] enters the first block."""
    vit = tiny_vit()
    prompted = PromptedViT(vit)
    x, prompts = torch.rand(2, 3, 16, 16), torch.randn(2, 5, 24)
    seen = {}
    handle = vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("z0", args[0]))
    prompted.forward_features(x, tokens=prompts)
    handle.remove()
    z0, pos = seen["z0"], vit.pos_embed
    assert z0.shape == (2, 1 + 5 + 4, 24)
    torch.testing.assert_close(prompt_position_embedding(vit), pos[:, :1])
    torch.testing.assert_close(z0[:, 0], (vit.cls_token + pos[:, :1]).expand(2, -1, -1)[:, 0])
    torch.testing.assert_close(z0[:, 1:6], prompts + pos[:, :1])
    patches = vit.patch_embed(x) + pos[:, 1:]
    torch.testing.assert_close(z0[:, 6:], patches)
    # The L2P head input: the mean of the prompt-token outputs after the final norm.
    out = prompted.forward_features(x, tokens=prompts)
    torch.testing.assert_close(prompted.prompt_mean(out, 5), out[:, 1:6].mean(1))


def test_prefixes_only_change_their_layers():
    vit = tiny_vit()
    prompted = PromptedViT(vit, prefix_layers=[2])
    x = torch.rand(2, 3, 16, 16)
    outputs = {}
    handles = [
        b.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out)) for i, b in enumerate(vit.blocks)
    ]
    vit.forward_features(x)
    plain = dict(outputs)
    prefix = torch.randn(2, 3, 24)
    prompted.forward_features(x, prefixes={2: (prefix, prefix)})
    for h in handles:
        h.remove()
    torch.testing.assert_close(outputs[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], plain[1], rtol=0, atol=0)
    assert (outputs[2] - plain[2]).abs().max() > 1e-3


def test_prefix_layers_are_checked():
    with pytest.raises(IncompatibleBackboneError, match="3 blocks"):
        PromptedViT(tiny_vit(), prefix_layers=[3])
    with pytest.raises(IncompatibleBackboneError, match="VisionTransformer"):
        PromptedViT(nn.Linear(2, 2))  # type: ignore[arg-type]
