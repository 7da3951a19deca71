"""SSF and VPT hooked into an unmodified timm ViT: closed forms, token layout, gradients, no leftovers."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from pilot.backbones.ssf import BLOCK_SITES, ScaleShift, SSFParams, ssf_active
from pilot.backbones.vpt import VisualPrompts, visual_prompts_active
from pilot.errors import IncompatibleBackboneError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)


def tiny_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY, **kwargs})
    return vit.requires_grad_(False).eval()


def images(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hook_count(vit: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules())


def randomise(params: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.named_parameters():
            p.copy_((1.0 if name.endswith("scale") else 0.0) + torch.randn(p.shape, generator=gen) * std)
    return params


# ----------------------------------------------------------------------------------------- SSF


@torch.no_grad()
def fold_ssf(vit: VisionTransformer, params: SSFParams) -> VisionTransformer:
    """A copy of ``vit`` whose weights absorb SSF: a module m(x) = W x + b (Linear, Conv2d, LayerNorm's
    affine part) followed by y = g * m(x) + s equals m'(x) with W' = diag(g) W, b' = g * b + s."""
    folded = copy.deepcopy(vit)

    def fold(module: nn.Module, ss: ScaleShift) -> None:
        g, s = ss.scale, ss.shift
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(g.view(shape))
        module.bias.copy_(module.bias * g + s)

    fold(folded.patch_embed.proj, params.patch_embed)
    if not isinstance(folded.norm, nn.Identity):
        fold(folded.norm, params.norm)
    for i, block in enumerate(folded.blocks):
        for site, path in BLOCK_SITES.items():
            fold(block.get_submodule(path), getattr(params.block(i), site))
    return folded


def test_ssf_sites_sizes_and_init_follow_pilot():
    vit = tiny_vit()
    params = SSFParams.for_vit(vit)
    names = [n for n, _ in params.named_parameters()]
    # 1 (patch embedding) + 6 per block + 1 (final norm) pairs, in PILOT's places.
    assert len(names) == 2 * (1 + 6 * 4 + 1)
    assert names[:2] == ["patch_embed.scale", "patch_embed.shift"] and names[-2:] == ["norm.scale", "norm.shift"]
    b0 = params.block(0)
    assert [b0.norm1.scale.numel(), b0.qkv.scale.numel(), b0.proj.scale.numel()] == [48, 144, 48]
    assert [b0.norm2.scale.numel(), b0.fc1.scale.numel(), b0.fc2.scale.numel()] == [48, 192, 48]
    assert sum(p.numel() for p in params.parameters()) == 2 * (48 + 4 * 48 * 11 + 48)
    scales = torch.cat([p.detach() for n, p in params.named_parameters() if n.endswith("scale")])
    shifts = torch.cat([p.detach() for n, p in params.named_parameters() if n.endswith("shift")])
    assert float(scales.mean()) == pytest.approx(1.0, abs=0.003) and float(scales.std()) == pytest.approx(0.02, rel=0.1)
    assert float(shifts.mean()) == pytest.approx(0.0, abs=0.003) and float(shifts.std()) == pytest.approx(0.02, rel=0.1)
    # ViT-B/16 (built on the meta device): 205,824 parameters = 2 * 768 * (1 + 12 * 11 + 1).
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert isinstance(vit_b, VisionTransformer)
    assert sum(p.numel() for p in SSFParams.for_vit(vit_b).parameters()) == 205_824


def test_ssf_identity_is_the_plain_vit_and_hooks_leave_no_trace():
    vit, x = tiny_vit(), images()
    plain = vit(x)
    keys = list(vit.state_dict())
    params = SSFParams.for_vit(vit).set_identity()
    with ssf_active(vit, params):
        assert hook_count(vit) == 1 + 6 * 4 + 1
        assert torch.equal(vit(x), plain)
        assert list(vit.state_dict()) == keys  # nothing registered inside the ViT
    assert hook_count(vit) == 0
    # Random parameters change the output inside the block only.
    randomise(params, seed=2)
    with ssf_active(vit, params):
        assert float((vit(x) - plain).detach().abs().max()) > 0.1
    assert torch.equal(vit(x), plain)
    # Removed on errors too.
    with pytest.raises(ZeroDivisionError), ssf_active(vit, params):
        _ = 1 / 0
    assert hook_count(vit) == 0


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.5, "qkv_bias": False}, {"global_pool": "avg"}])
def test_ssf_equals_the_vit_with_folded_weights(variant):
    """Closed form: scaling and shifting the output of a Linear / conv / LayerNorm is a change of its
    weights, so the SSF forward equals the plain forward of a copy with folded weights (LayerScale,
    average pooling with fc_norm: the final-norm site is then an Identity, folded into nothing)."""
    vit, x = tiny_vit(**variant), images()
    params = randomise(SSFParams.for_vit(vit), seed=3)
    if variant.get("qkv_bias") is False:  # no bias to fold the qkv shift into: give the copy one
        for block in vit.blocks:
            block.attn.qkv.bias = nn.Parameter(torch.zeros(3 * 48), requires_grad=False)
    if isinstance(vit.norm, nn.Identity):  # global_pool="avg": no final norm to fold the last site into
        params.norm.set_identity()
    with ssf_active(vit, params):
        ours = vit.forward_features(x)
    torch.testing.assert_close(ours, fold_ssf(vit, params).forward_features(x), rtol=1e-5, atol=1e-5)
    assert float((ours - vit.forward_features(x)).detach().abs().max()) > 0.1


def test_ssf_gradients_reach_every_ssf_parameter_and_no_vit_weight():
    vit, x = tiny_vit(), images()
    params = SSFParams.for_vit(vit)
    with ssf_active(vit, params):
        vit(x).square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.parameters())
    assert all(p.grad is None for p in vit.parameters())
    # Shift of the final norm: d/dbeta sum(y^2) = 2 * sum over the batch of y (closed form).
    with torch.no_grad(), ssf_active(vit, params):
        y = vit(x)
    torch.testing.assert_close(params.norm.shift.grad, 2 * y.sum(0), rtol=1e-5, atol=1e-5)


def test_ssf_under_bf16_autocast_keeps_dtypes_and_trains_fp32_params():
    vit, x = tiny_vit(), images()
    params = randomise(SSFParams.for_vit(vit), seed=4, std=0.05)
    with ssf_active(vit, params):
        reference = vit(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = vit(x)
        with ssf_active(vit, params):
            ours = vit(x)
    assert ours.dtype == plain.dtype
    torch.testing.assert_close(ours.float(), reference, rtol=0.1, atol=0.1)
    ours.float().square().sum().backward()
    assert params.block(0).qkv.scale.grad is not None and params.block(0).qkv.scale.grad.dtype == torch.float32


def test_ssf_rejects_non_vits_wrong_sizes_nesting_and_checkpointing():
    with pytest.raises(IncompatibleBackboneError, match="timm VisionTransformer"):
        SSFParams.for_vit(nn.Linear(3, 3))
    post = tiny_vit(block_fn=ResPostBlock)
    with pytest.raises(IncompatibleBackboneError, match="block 0 is a ResPostBlock"):
        SSFParams.for_vit(post)
    vit = tiny_vit()
    with pytest.raises(ValueError, match="4 blocks"):
        ssf_active(vit, SSFParams.for_vit(tiny_vit(depth=2))).__enter__()
    with pytest.raises(ValueError, match="channels"):
        ssf_active(vit, SSFParams.for_vit(tiny_vit(mlp_ratio=2.0))).__enter__()
    params = SSFParams.for_vit(vit)
    with ssf_active(vit, params), pytest.raises(RuntimeError, match="nested"):
        ssf_active(vit, params).__enter__()
    vit.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="checkpointing"):
        ssf_active(vit, params).__enter__()
    assert hook_count(vit) == 0


# ----------------------------------------------------------------------------------------- VPT


def block_inputs(vit: VisionTransformer) -> tuple[list[torch.Tensor], list]:
    """Records the sequence each block works on (the input of its norm1, inside the block)."""
    seen: list[torch.Tensor] = []
    handles = [b.norm1.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach())) for b in vit.blocks]
    return seen, handles


@torch.no_grad()
def vpt_by_hand(vit: VisionTransformer, x: torch.Tensor, prompts: torch.Tensor, deep: bool) -> torch.Tensor:
    """PILOT's VPT_ViT forward written out: z = [embedded tokens, prompts] (no position embedding);
    deep: z_l = Block_l([z_{l-1}, p^l])[:, :1+N]; shallow: prompts once, dropped after the last block."""
    z = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    n, count = z.shape[1], prompts.shape[1]
    batch = lambda p: p.unsqueeze(0).expand(z.shape[0], -1, -1)  # noqa: E731
    if deep:
        for layer, block in enumerate(vit.blocks):
            z = block(torch.cat([z, batch(prompts[layer])], 1))[:, :n]
    else:
        z = torch.cat([z, batch(prompts[0])], 1)
        for block in vit.blocks:
            z = block(z)
        assert z.shape[1] == n + count
        z = z[:, :n]
    return vit.norm(z)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_token_layout_and_closed_form(deep):
    vit, x = tiny_vit(), images()
    plain_tokens = vit.forward_features(x)
    prompts = randomise(VisualPrompts.for_vit(vit, 5, deep), seed=5, std=1.0)
    assert isinstance(prompts, VisualPrompts)
    assert prompts.prompts.shape == ((4 if deep else 1), 5, 48)
    seen, handles = block_inputs(vit)
    with visual_prompts_active(vit, prompts):
        tokens = vit.forward_features(x)
        pooled = vit.forward_head(tokens, pre_logits=True)
    for h in handles:
        h.remove()
    # Every block works on 1 + 16 + 5 tokens; the outputs have the plain shapes.
    assert [s.shape for s in seen] == [(3, 1 + 16 + 5, 48)] * 4
    assert tokens.shape == plain_tokens.shape == (3, 17, 48) and pooled.shape == (3, 48)
    # Prompts are at the end, without position embedding; the patch tokens before them are the plain ones.
    assert torch.equal(seen[0][:, -5:], prompts.prompts[0].detach().expand(3, -1, -1))
    with torch.no_grad():
        embedded = vit._pos_embed(vit.patch_embed(x))
    assert torch.equal(seen[0][:, :17], embedded)
    for layer in range(1, 4):  # deep: layer l's fresh prompts; shallow: block l-1's prompt outputs
        fresh = torch.equal(seen[layer][:, -5:], prompts.prompts[layer if deep else 0].detach().expand(3, -1, -1))
        assert fresh == deep
    torch.testing.assert_close(tokens, vpt_by_hand(vit, x, prompts.prompts.detach(), deep), rtol=1e-5, atol=1e-5)
    assert torch.equal(vit.forward_features(x), plain_tokens) and hook_count(vit) == 0


@pytest.mark.parametrize("deep", [False, True])
def test_zero_prompts_change_the_features_and_train_alone(deep):
    """Zero prompts are not a no-op (they take part in attention), but get gradients; the ViT gets none."""
    vit, x = tiny_vit(), images()
    plain = vit(x)
    keys = list(vit.state_dict())
    prompts = VisualPrompts.for_vit(vit, 3, deep)
    assert not prompts.prompts.any()
    with visual_prompts_active(vit, prompts):
        out = vit(x)
        assert list(vit.state_dict()) == keys
    assert out.shape == plain.shape and float((out - plain).detach().abs().max()) > 1e-3
    out.square().sum().backward()
    per_layer = prompts.prompts.grad.abs().sum(dim=(1, 2))
    assert per_layer.shape == ((4,) if deep else (1,)) and bool((per_layer > 0).all())
    assert all(p.grad is None for p in vit.parameters())


def test_prompt_position_in_the_sequence_does_not_matter():
    """No position embedding + permutation-equivariant attention: prompts placed right after CLS (the
    paper's layout) give the same CLS feature as prompts at the end (PILOT's layout)."""
    vit, x = tiny_vit(), images()
    prompts = randomise(VisualPrompts.for_vit(vit, 4, deep=False), seed=6, std=1.0)
    with visual_prompts_active(vit, prompts):
        ours = vit(x)
    with torch.no_grad():
        z = vit._pos_embed(vit.patch_embed(x))
        z = torch.cat([z[:, :1], prompts.prompts.detach().expand(3, -1, -1), z[:, 1:]], 1)
        paper = vit.forward_head(vit.norm(vit.blocks(z)), pre_logits=True)
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-5)


def test_vpt_xavier_init_bound_and_bf16_autocast():
    vit, x = tiny_vit(), images()
    prompts = VisualPrompts.for_vit(vit, 5, deep=True, init="xavier_uniform")
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))
    assert float(prompts.prompts.detach().abs().max()) <= bound
    assert float(prompts.prompts.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    with visual_prompts_active(vit, prompts):
        reference = vit(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = vit(x)
        with visual_prompts_active(vit, prompts):
            ours = vit(x)
    assert ours.dtype == plain.dtype and ours.shape == (3, 48)
    torch.testing.assert_close(ours.float(), reference, rtol=0.1, atol=0.1)
    ours.float().sum().backward()
    assert prompts.prompts.grad is not None and prompts.prompts.grad.dtype == torch.float32


def test_vpt_rejects_non_vits_wrong_shapes_nesting_and_checkpointing():
    with pytest.raises(IncompatibleBackboneError, match="timm VisionTransformer"):
        VisualPrompts.for_vit(nn.Linear(3, 3), 5, deep=True)
    with pytest.raises(ValueError, match="at least one"):
        VisualPrompts.for_vit(tiny_vit(), 0, deep=False)
    with pytest.raises(ValueError, match="unknown prompt init"):
        VisualPrompts.for_vit(tiny_vit(), 2, deep=False, init="normal")  # type: ignore[arg-type]
    vit = tiny_vit()
    with pytest.raises(ValueError, match="4 blocks"):
        visual_prompts_active(vit, VisualPrompts.for_vit(tiny_vit(depth=2), 5, deep=True)).__enter__()
    prompts = VisualPrompts.for_vit(vit, 5, deep=False)
    with visual_prompts_active(vit, prompts), pytest.raises(RuntimeError, match="nested"):
        visual_prompts_active(vit, prompts).__enter__()
    vit.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="checkpointing"):
        visual_prompts_active(vit, prompts).__enter__()
    assert hook_count(vit) == 0


def test_ssf_and_vpt_compose():
    """Both at once (no learner needs it, but nothing prevents it): equals VPT by hand on the folded ViT."""
    vit, x = tiny_vit(), images()
    params = randomise(SSFParams.for_vit(vit), seed=7, std=0.1)
    prompts = randomise(VisualPrompts.for_vit(vit, 2, deep=True), seed=8, std=1.0)
    with ssf_active(vit, params), visual_prompts_active(vit, prompts):
        ours = vit.forward_features(x)
    expected = vpt_by_hand(fold_ssf(vit, params), x, prompts.prompts.detach(), deep=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
