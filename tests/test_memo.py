"""MEMO: the ViT split (identity at the pre-trained init), PILOT's random specialised block, which blocks train
in which session (generalised blocks frozen after session 0 as PILOT), parameter counts, a resumed run."""

from __future__ import annotations

import math

import pytest
import torch
from test_ease_slca import fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TRAIN
from pilot.errors import IncompatibleBackboneError

D, DEPTH = 48, 6  # the tiny test ViT
BLOCK = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)  # 2 LNs, qkv, proj, mlp


def memo(scenario, runtime, **params):
    return make_learner("memo", tiny_vit(), scenario, runtime, memory_size=24, batch_size=8, **params)


def images(pipeline, classes: range, n: int = 16):
    return next(iter(pipeline.batches(TRAIN, classes, n))).images


@pytest.mark.parametrize("blocks", [1, 2])
def test_split_with_the_pretrained_last_blocks_is_the_backbone(blocks):
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = memo(scenario, runtime, specialized_blocks=blocks)
    learner.begin_session(scenario.sessions[0])
    learner.eval()
    x = images(pipeline, range(2))
    with torch.no_grad():
        assert learner.shared_tokens(x).shape == (16, 1 + 16, D)  # CLS + 4x4 patches after DEPTH - blocks blocks
        torch.testing.assert_close(learner.exemplar_features(x), learner.backbone(x), rtol=1e-5, atol=1e-5)
    assert len(learner.grown[0]) == blocks + 1  # the last blocks and the final norm


def test_random_init_is_pytorchs_default_for_the_block_and_keeps_the_pretrained_norm():
    runtime, scenario, _ = tiny_setup(num_classes=4)
    learner = memo(scenario, runtime, specialized_init="random")
    learner.begin_session(scenario.sessions[0])
    block, norm = learner.grown[0]
    vit = learner.backbone.vit
    assert not torch.equal(block.attn.qkv.weight, vit.blocks[-1].attn.qkv.weight)
    assert torch.equal(block.norm1.weight, torch.ones(D)) and torch.equal(block.norm2.bias, torch.zeros(D))
    for linear, fan_in in ((block.attn.qkv, D), (block.mlp.fc2, 4 * D)):  # U(+-1/sqrt(fan_in)) for W and b
        assert linear.weight.abs().max() <= 1 / math.sqrt(fan_in) and linear.bias.abs().max() <= 1 / math.sqrt(fan_in)
        assert linear.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert all(torch.equal(a, b) for a, b in zip(norm.parameters(), vit.norm.parameters()))


def test_generalised_blocks_train_in_session_0_only_and_older_specialised_blocks_stay():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = memo(scenario, runtime, epochs=1, init_epochs=1)
    vit = learner.backbone.vit
    start = {k: v.clone() for k, v in vit.state_dict().items()}
    fit(learner, pipeline, scenario.sessions[0])
    trunk_trainable = sum(p.numel() for p in vit.parameters()) - BLOCK - 2 * D  # all but the last block and norm
    assert learner.trainable_parameters == trunk_trainable + (BLOCK + 2 * D) + (2 * D + 2) + (3 * D + 3)
    changed = {k for k, v in vit.state_dict().items() if not torch.equal(v, start[k])}
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed
    assert not any(k.startswith((f"blocks.{DEPTH - 1}.", "norm.")) for k in changed)  # sources of s_0 only
    after0 = {k: v.clone() for k, v in learner.state_dict().items()}

    fit(learner, pipeline, scenario.sessions[1])
    assert learner.trainable_parameters == (BLOCK + 2 * D) + (4 * 2 * D + 4) + (3 * D + 3)  # s_1, fc, aux
    state = learner.state_dict()
    frozen = [k for k in after0 if k.startswith(("backbone.", "grown.0."))]
    assert len(frozen) == len(vit.state_dict()) + len(learner.grown[0].state_dict())
    assert all(torch.equal(state[k], after0[k]) for k in frozen)  # g and s_0: unchanged by session 1
    assert any(not torch.equal(a, b) for a, b in zip(learner.grown[1].parameters(), learner.grown[0].parameters()))
    x = images(pipeline, range(4), 64)
    assert learner.exemplar_features(x).shape == (64, 2 * D)
    assert learner.memory.class_means.shape == (4, 2 * D)  # NME means on the concatenated features


def test_train_base_and_train_adaptive_keep_everything_trainable():
    runtime, scenario, _ = tiny_setup(num_classes=4)
    learner = memo(scenario, runtime, train_base=True, train_adaptive=True)
    learner.train()
    learner.begin_session(scenario.sessions[0])
    learner.begin_session(scenario.sessions[1])
    assert all(p.requires_grad for p in learner.backbone.vit.blocks[0].parameters())
    assert all(p.requires_grad for m in learner.grown for p in m.parameters())
    assert learner.backbone.training and learner.grown[0].training
    frozen = memo(scenario, runtime)
    frozen.train()
    frozen.begin_session(scenario.sessions[0])
    frozen.begin_session(scenario.sessions[1])
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert not any(p.requires_grad for p in frozen.grown[0].parameters())
    assert not frozen.backbone.training and not frozen.grown[0].training and frozen.grown[1].training


def test_a_split_without_shared_blocks_is_refused():
    runtime, scenario, _ = tiny_setup(num_classes=4)
    with pytest.raises(IncompatibleBackboneError, match="specialized_blocks=6"):
        memo(scenario, runtime, specialized_blocks=DEPTH)


def test_memo_resumes_identically(tmp_path):
    overrides = ["backbone=vit_test_tiny", "dataset=synthetic", "logger=csv", "runtime.device=cpu"]
    overrides += ["runtime.progress=false", *TWO_SESSIONS, *small_overrides("memo"), "method.memory_size=24"]
    assert_resumes_identically(overrides, tmp_path)
