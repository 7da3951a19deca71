"""DER: the growing classifier and auxiliary loss in closed form, one backbone per session with the older
ones frozen, concatenated features, weight aligning, and a resumed run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_ease_slca import fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TRAIN
from pilot.modules.growing import align_weights, auxiliary_loss, auxiliary_targets, grow_linear

D = 48  # width of the tiny test ViT


# ------------------------------------------------------------------------------------- formulas
def test_grow_linear_keeps_the_old_block_and_draws_the_rest_as_pilots_simple_linear():
    torch.manual_seed(0)
    old = grow_linear(None, 4, 3)
    assert torch.equal(old.bias, torch.zeros(3)) and old.weight.abs().max() <= math.sqrt(3 / 4)
    new = grow_linear(old, 8, 5)
    assert new.weight.shape == (5, 8)
    assert torch.equal(new.weight[:3, :4], old.weight) and torch.equal(new.bias[:3], old.bias)
    assert torch.equal(new.bias[3:], torch.zeros(2))
    fresh = torch.cat([new.weight[:3, 4:].flatten(), new.weight[3:].flatten()])
    assert fresh.abs().max() <= math.sqrt(3 / 8) and (fresh != 0).all()  # old rows on new features: random
    big = grow_linear(None, 400, 500).weight  # U(-sqrt(3/d), sqrt(3/d)): std 1/sqrt(d) = 0.05
    assert big.std().item() == pytest.approx(0.05, rel=0.02)
    assert big.abs().max().item() == pytest.approx(math.sqrt(3 / 400), rel=1e-3)
    with pytest.raises(ValueError):
        grow_linear(new, 4, 5)


def test_auxiliary_targets_and_loss_in_closed_form():
    labels, known = torch.tensor([0, 3, 4, 5, 1, 7]), 4
    assert auxiliary_targets(labels, known).tolist() == [0, 0, 1, 2, 0, 4]
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    expected = -(log_p[torch.arange(6), torch.tensor([0, 0, 1, 2, 0, 4])]).mean()
    assert auxiliary_loss(logits, labels, known).item() == pytest.approx(expected.item(), rel=1e-6)


def test_weight_aligning_scales_the_new_rows_to_the_old_mean_norm():
    layer = grow_linear(None, 2, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]]))  # norms 5, 1 | 10, 2
    gamma = align_weights(layer, num_new=2)
    assert gamma == pytest.approx(3.0 / 6.0)
    torch.testing.assert_close(layer.weight, torch.tensor([[3.0, 4.0], [0.0, 1.0], [3.0, 4.0], [0.0, 1.0]]))


# -------------------------------------------------------------------------------------- learner
def test_one_backbone_per_session_concatenated_features_and_frozen_older_backbones():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner("der", tiny_vit(), scenario, runtime, epochs=1, init_epochs=1, batch_size=8, memory_size=24)
    start = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    fit(learner, pipeline, scenario.sessions[0])
    trained = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # session 0 fine-tunes f_0
    assert len(learner.memory) == 24 and learner.memory.class_means.shape == (2, D)
    fc0 = learner.classifier.fc.weight.detach().clone()

    learner.train()
    learner.begin_session(scenario.sessions[1])
    f0, f1 = learner.extractors()
    assert all(torch.equal(v, trained[k]) for k, v in f1.state_dict().items())  # f_1 starts as a copy of f_0
    assert not any(p.requires_grad for p in f0.parameters()) and all(p.requires_grad for p in f1.parameters())
    assert not f0.training and f1.training  # older backbone in eval mode while training
    fc, aux = learner.classifier.fc, learner.classifier.aux
    assert fc.weight.shape == (4, 2 * D) and aux.weight.shape == (3, D)
    assert torch.equal(fc.weight[:2, :D], fc0)

    batch = next(iter(pipeline.batches(TRAIN, range(4), 64)))  # all 64 training images
    with torch.no_grad():
        feats = learner.exemplar_features(batch.images)
        assert feats.shape == (64, 2 * D)
        torch.testing.assert_close(feats, torch.cat([f0(batch.images), f1(batch.images)], dim=1))
    learner.train_session(pipeline.session(scenario.sessions[1]))
    assert all(torch.equal(v, trained[k]) for k, v in f0.state_dict().items())  # frozen: unchanged
    assert any(not torch.equal(v, trained[k]) for k, v in f1.state_dict().items())
    expected = sum(p.numel() for p in f1.parameters()) + (4 * 2 * D + 4) + (3 * D + 3)
    assert sum(p.numel() for p in learner.parameters() if p.requires_grad) == expected


def test_loss_is_classifier_ce_plus_auxiliary_ce_after_session_0():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner("der", tiny_vit(), scenario, runtime, aux_weight=0.5, memory_size=24)
    learner.begin_session(scenario.sessions[0])
    batch = next(iter(pipeline.batches(TRAIN, range(2), 8)))
    assert set(learner.losses(batch)) == {"clf"}  # session 0: CE alone (PILOT _init_train)
    learner.begin_session(scenario.sessions[1])
    batch = next(iter(pipeline.batches(TRAIN, range(4), 64)))  # old and new classes
    with torch.no_grad():
        f0, f1 = (e(batch.images) for e in learner.extractors())
        fc, aux = learner.classifier.fc, learner.classifier.aux
        logits = torch.cat([f0, f1], 1) @ fc.weight.T + fc.bias
        y_aux = torch.where(batch.labels >= 2, batch.labels - 1, 0)
        expected = F.cross_entropy(logits, batch.labels) + 0.5 * F.cross_entropy(f1 @ aux.weight.T + aux.bias, y_aux)
        assert learner.loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
        assert learner.predict(batch).shape == (64, 4)


def test_weight_align_switch_equalises_new_and_old_row_norms():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner(
        "der", tiny_vit(), scenario, runtime, epochs=1, init_epochs=1, batch_size=8, memory_size=24, weight_align=True
    )
    fit(learner, pipeline, scenario.sessions[0])
    fit(learner, pipeline, scenario.sessions[1])
    norms = learner.classifier.fc.weight.norm(dim=1)
    assert norms[2:].mean().item() == pytest.approx(norms[:2].mean().item(), rel=1e-5)


def test_der_resumes_identically(tmp_path):
    overrides = ["backbone=vit_test_tiny", "dataset=synthetic", "logger=csv", "runtime.device=cpu"]
    overrides += ["runtime.progress=false", *TWO_SESSIONS, *small_overrides("der"), "method.memory_size=24"]
    assert_resumes_identically(overrides, tmp_path)
