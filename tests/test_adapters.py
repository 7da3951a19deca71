"""AdaptFormer adapters hooked into an unmodified timm ViT: placement, init, batching, cost."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock
from torch.utils.flop_counter import FlopCounterMode

from pilot.backbones.adapters import AdapterSet, adapters_active, check_adaptable, multi_adapter_features
from pilot.backbones.backbone import Backbone
from pilot.errors import IncompatibleBackboneError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3)


def tiny_backbone(seed: int = 0, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY, **kwargs})
    return Backbone(model, "vit_tiny", 32, None, None, pretrained=False).freeze()


def randomise(adapter_set: AdapterSet, seed: int) -> AdapterSet:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_set.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return adapter_set.eval()


def hook_counts(vit) -> int:
    modules = [vit.blocks[0], *vit.blocks, *(b.norm2 for b in vit.blocks)]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_fresh_adapter_set_is_initialised_as_the_reference_and_changes_nothing():
    bb = tiny_backbone()
    images = torch.rand(4, 3, 32, 32)
    plain = bb(images)
    fresh = AdapterSet.for_vit(bb.vit).eval()
    assert len(fresh) == 6
    down = torch.stack([a.down.weight for a in fresh.adapters]).detach()
    assert down.shape == (6, 64, 48)
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt 5) on fan_in 48
    assert float(down.abs().max()) <= bound
    assert float(down.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for a in fresh.adapters:
        assert a.scale == 0.1 and a.dropout == 0.1
        assert not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
    # Zero up-projection: exactly the pretrained output.
    assert torch.equal(multi_adapter_features(bb, bb.vit, images, [fresh])[:, 0], plain)
    # Three fresh sets in one batched pass: three copies of it (batch 12 instead of 4: allclose).
    three = multi_adapter_features(bb, bb.vit, images, [fresh, AdapterSet.for_vit(bb.vit).eval(), fresh])
    assert three.shape == (4, 3, 48)
    torch.testing.assert_close(three, plain.unsqueeze(1).expand(-1, 3, -1), rtol=0, atol=1e-5)
    # The hooks are gone after the pass and the ViT is untouched.
    assert hook_counts(bb.vit) == 0
    assert torch.equal(bb(images), plain)


def test_adapter_is_parallel_to_the_mlp_on_the_post_attention_residual():
    """Block output = h + ls2(mlp(norm2(h))) + 0.1 * up(relu(down(h))), h = x + ls1(attn(norm1(x))):
    checked by hand on one block with a non-zero adapter and LayerScale != 1 (which must scale the
    MLP only)."""
    bb = tiny_backbone(init_values=0.5)
    block = bb.vit.blocks[2]
    assert float(block.ls2.gamma[0]) == 0.5
    adapter_set = AdapterSet.for_vit(bb.vit).eval()
    target = adapter_set[2]
    randomise(adapter_set, seed=3)
    with torch.no_grad():  # only block 2's adapter is non-zero
        for i, a in enumerate(adapter_set.adapters):
            if i != 2:
                a.up.weight.zero_()
                a.up.bias.zero_()
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    images = torch.rand(2, 3, 32, 32)
    with adapters_active(bb.vit, [adapter_set]):
        block.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))  # after the adapter hook
        bb(images)
    x = seen["x"]
    with torch.no_grad():
        h = x + block.ls1(block.attn(block.norm1(x)))
        mlp = block.ls2(block.mlp(block.norm2(h)))
        branch = torch.relu(h @ target.down.weight.T + target.down.bias) @ target.up.weight.T + target.up.bias
        expected = h + mlp + 0.1 * branch
        wrong_inside_ls = h + block.ls2(block.mlp(block.norm2(h)) + 0.1 * branch)
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(seen["out"], wrong_inside_ls, atol=1e-3)
    assert (0.1 * branch).abs().max() > 1e-2  # the adapter really contributes


def test_batched_sets_equal_separate_passes_and_dropout_follows_train_mode():
    bb = tiny_backbone()
    sets = [randomise(AdapterSet.for_vit(bb.vit), seed) for seed in (1, 2, 3)]
    images = torch.rand(3, 3, 32, 32)
    batched = multi_adapter_features(bb, bb.vit, images, sets)
    for k, s in enumerate(sets):
        alone = multi_adapter_features(bb, bb.vit, images, [s])[:, 0]
        torch.testing.assert_close(batched[:, k], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[:, 0], batched[:, 1], atol=1e-3)
    # Train mode: dropout 0.1 in the adapters makes two passes differ; eval mode is deterministic.
    sets[0].train()
    a = multi_adapter_features(bb, bb.vit, images, sets[:1])
    b = multi_adapter_features(bb, bb.vit, images, sets[:1])
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="share train/eval mode"):
        multi_adapter_features(bb, bb.vit, images, sets)


def test_batched_pass_costs_k_vit_passes_with_patch_embedding_once():
    """FLOPs of matmuls/convolutions (attention products are not counted by FlopCounterMode on CPU)."""
    bb = tiny_backbone()
    sets = [AdapterSet.for_vit(bb.vit).eval() for _ in range(3)]
    images = torch.rand(2, 3, 32, 32)
    with FlopCounterMode(display=False) as plain:
        bb(images)
    with FlopCounterMode(display=False) as batched:
        multi_adapter_features(bb, bb.vit, images, sets)
    p = {str(k): v for k, v in plain.get_flop_counts()["Global"].items()}
    b = {str(k): v for k, v in batched.get_flop_counts()["Global"].items()}
    tokens = 2 * 17  # batch x (16 patches + CLS)
    assert b["aten.convolution"] == p["aten.convolution"]  # patch embedding once, not 3 times
    assert b["aten.addmm"] == 3 * p["aten.addmm"]  # every block's linear layers on 3 copies
    assert b["aten.baddbmm"] == 3 * 6 * 2 * (2 * tokens * 48 * 64)  # 3 sets x 6 blocks x (down, up)


def test_only_pre_norm_timm_blocks_are_adaptable_and_activation_does_not_nest():
    check_adaptable(tiny_backbone().vit)
    torch.manual_seed(0)
    post = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, block_fn=ResPostBlock, **TINY)
    with pytest.raises(IncompatibleBackboneError, match="ResPostBlock"):
        check_adaptable(post)
    bb = tiny_backbone()
    s = AdapterSet.for_vit(bb.vit)
    with adapters_active(bb.vit, [s]):
        with pytest.raises(RuntimeError, match="already active"):
            with adapters_active(bb.vit, [s]):
                pass
    assert hook_counts(bb.vit) == 0
