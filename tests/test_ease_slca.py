"""EASE and SLCA: the mechanisms against hand computations, checkpoints, backbones, end to end."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import run_config
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from pilot.api import make_learner
from pilot.backbones.adapters import multi_adapter_features
from pilot.backbones.backbone import Backbone
from pilot.backbones.factory import create_timm_backbone
from pilot.data.datasets import synthetic
from pilot.data.pipeline import TEST, TRAIN, DataPipeline
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms
from pilot.errors import IncompatibleBackboneError
from pilot.learners import slca as slca_module
from pilot.learners.ease import complement_prototypes, ensemble_logits
from pilot.learners.slca import mean_scale_sessions
from pilot.modules.alignment import align_classifier, mean_scale, session_normalized_logits
from pilot.modules.classifiers import class_means
from pilot.modules.features import extract_features
from pilot.modules.gaussian import ClassGaussians, class_statistics
from pilot.runtime import make_runtime

E = math.e


# ---------------------------------------------------------------------------------- helpers
def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return create_timm_backbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        input_size=32,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3),
    )


def tiny_setup(num_classes: int = 6, init_cls: int = 2, increment: int = 2):
    runtime = make_runtime(device="cpu", progress=False, channels_last=False)
    scenario = make_scenario(num_classes, init_cls, increment)
    pipeline = DataPipeline(synthetic(num_classes=num_classes), scenario, ImageTransforms(32), runtime)
    return runtime, scenario, pipeline


def fit(learner, pipeline, info) -> None:
    learner.train()
    learner.fit(pipeline.session(info))
    learner.eval()


def all_logits(learner, pipeline, total: int) -> torch.Tensor:
    return torch.cat([learner.predict(b) for b in pipeline.batches(TEST, range(total), 20)])


# ------------------------------------------------------------------------- EASE mechanisms
def test_prototype_complement_on_a_hand_made_example():
    # Two sessions: session 0 = classes 0,1; session 1 = classes 2,3,4. D = 2.
    P = torch.zeros(5, 2, 2)
    P[0, 0], P[1, 0] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # Â (real)
    P[2:, 0] = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # A: new classes, subspace 0
    P[2:, 1] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # B: new classes, subspace 1
    out = complement_prototypes(P, [0, 2, 5])
    # cos(Â, A) = [[1, 1, 0], [0, 0, 1]]; row softmax (temperature 1); W @ B.
    row0 = (E * np.array([1, 0]) + E * np.array([0, 1]) + np.array([1, 1])) / (2 * E + 1)
    row1 = (np.array([1, 0]) + np.array([0, 1]) + E * np.array([1, 1])) / (2 + E)
    np.testing.assert_allclose(out[0, 1].numpy(), row0, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1].numpy(), row1, rtol=1e-6)
    assert torch.equal(out[:, 0], P[:, 0]) and torch.equal(out[2:, 1], P[2:, 1])  # real entries kept

    # Three sessions of one class: (0 -> 1) uses the classes of sessions 1..2, (0 -> 2) and (1 -> 2) session 2 only.
    Q = torch.zeros(3, 3, 2)
    Q[0, 0], Q[1, 0], Q[2, 0] = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    Q[1, 1], Q[2, 1] = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 5.0])
    Q[2, 2] = torch.tensor([7.0, 7.0])
    out = complement_prototypes(Q, [0, 1, 2, 3])
    np.testing.assert_allclose(out[0, 1].numpy(), [3 * E / (1 + E), 5 / (1 + E)], rtol=1e-6)
    np.testing.assert_allclose(out[0, 2].numpy(), [7, 7])
    np.testing.assert_allclose(out[1, 2].numpy(), [7, 7])


def test_ensemble_logits_on_hand_made_features():
    # T = 2 (three subspaces), classes 0,1 of session 0, class 2 of session 1, class 3 of session 2.
    ex, ey = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f = torch.stack([ex, ey, 2 * ex]).unsqueeze(0)  # [1, 3, 2], norms irrelevant
    P = torch.stack(
        [
            torch.stack([ex, ex, ex]),  # class 0: cos = 1, 0, 1
            torch.stack([ey, ey, -ex]),  # class 1: cos = 0, 1, -1
            torch.stack([ex, 5 * ey, ey]),  # class 2: cos = 1, 1, 0
            torch.stack([-ex, ey, 3 * ex]),  # class 3: cos = -1, 1, 1
        ]
    )
    sessions = torch.tensor([0, 0, 1, 2])
    w = 0.1 / 2
    expected = [1 + w * (0 + 1), 0 + w * (1 - 1), 1 + w * (1 + 0), 1 + w * (-1 + 1)]
    torch.testing.assert_close(ensemble_logits(f, P, sessions, alpha=0.1)[0], torch.tensor(expected))
    # T = 0: only the diagonal term, a plain cosine.
    torch.testing.assert_close(ensemble_logits(f[:, :1], P[:2, :1], sessions[:2]), torch.tensor([[1.0, 0.0]]))


@pytest.fixture(scope="module")
def ease_three_sessions():
    """EASE on the tiny ViT after three sessions of two classes (one epoch each)."""
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup()
    learner = make_learner("ease", tiny_vit(), scenario, runtime, epochs=1, batch_size=16)
    for info in scenario.sessions:
        fit(learner, pipeline, info)
    return learner, scenario, pipeline, runtime


def test_ease_prototypes_are_class_means_in_every_subspace(ease_three_sessions):
    learner, scenario, pipeline, runtime = ease_three_sessions
    assert len(learner.adapters) == 3 and all(s.frozen for s in learner.adapters)
    assert learner.prototypes.shape == (6, 3, 48)
    info = scenario.sessions[2]
    for j, adapter_set in enumerate(learner.adapters):  # the newest classes: real means under every set
        feats, labels = extract_features(
            lambda x, s=adapter_set: multi_adapter_features(learner.backbone, learner.backbone.vit, x, [s])[:, 0],
            pipeline.batches(TRAIN, info.new_classes, 7),
            runtime,
        )
        torch.testing.assert_close(
            learner.prototypes[4:6, j], class_means(feats, labels, info.new_classes), rtol=1e-4, atol=1e-5
        )
    # Old classes in later subspaces: the complement of the real entries.
    torch.testing.assert_close(learner.prototypes, complement_prototypes(learner.prototypes, [0, 2, 4, 6]))
    assert learner.prototypes[0:2, 2].abs().sum() > 0


def test_ease_caches_frozen_sets_and_predicts_the_same(ease_three_sessions, monkeypatch):
    learner, scenario, pipeline, runtime = ease_three_sessions
    for cache in learner._caches:
        cache.clear()
    computed = []
    original = learner.subspace_features

    def counting(images, sets=None):
        computed.append(len(images) * (len(learner.adapters) if sets is None else len(sets)))
        return original(images, sets)

    monkeypatch.setattr(learner, "subspace_features", counting)
    first = all_logits(learner, pipeline, 6)
    assert sum(computed) == 48 * 3  # 48 test images x 3 sets, once
    computed.clear()
    again = all_logits(learner, pipeline, 6)
    assert sum(computed) == 0 and torch.equal(first, again)
    learner.cache_features = False
    try:
        uncached = all_logits(learner, pipeline, 6)
        learner.sets_per_pass = 1  # one adapter set per ViT pass: same numbers, less memory
        one_by_one = all_logits(learner, pipeline, 6)
    finally:
        learner.cache_features, learner.sets_per_pass = True, None
    torch.testing.assert_close(first, uncached, rtol=0, atol=1e-5)
    torch.testing.assert_close(one_by_one, uncached, rtol=0, atol=1e-5)
    assert (first.argmax(1) == torch.arange(6).repeat_interleave(8)).float().mean() > 0.5


def test_ease_checkpoint_restores_every_adapter_set(ease_three_sessions):
    learner, scenario, pipeline, runtime = ease_three_sessions
    state = learner.state_dict()
    assert not any(k.startswith("backbone.") for k in state)  # frozen backbone left out
    assert {k.split(".")[1] for k in state if k.startswith("adapters.")} == {"0", "1", "2"}
    fresh = make_learner("ease", tiny_vit(), scenario, runtime, epochs=1, batch_size=16)
    fresh.restore(state, 3)
    fresh.eval()
    assert all(s.frozen for s in fresh.adapters)
    assert torch.equal(all_logits(fresh, pipeline, 6), all_logits(learner, pipeline, 6))


def test_ease_on_vit_b16_trains_one_adapter_set_and_refuses_a_cnn():
    runtime, scenario, _ = tiny_setup(num_classes=20, init_cls=10, increment=10)
    torch.manual_seed(0)
    vit_b = Backbone(
        timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0),
        "vit_base_patch16_224",
        224,
        None,
        None,
        pretrained=False,
    )
    learner = make_learner("ease", vit_b, scenario, runtime)
    per_set = 12 * (768 * 64 + 64 + 64 * 768 + 768)
    assert per_set == 1_189_632  # docs/methods.md §4.1: "≈1.19 M params per session"
    for info in scenario.sessions:
        learner.begin_session(info)
        trainable = [p for p in learner.parameters() if p.requires_grad]
        assert sum(p.numel() for p in learner.adapters[-1].parameters()) == per_set
        # the new set + the proxy cosine head over the session's 10 classes (+ sigma); old sets frozen
        assert sum(p.numel() for p in trainable) == per_set + 10 * 768 + 1
    assert sum(p.numel() for p in learner.adapters.parameters()) == 2 * per_set

    torch.manual_seed(0)
    resnet = Backbone(
        timm.create_model("resnet18", pretrained=False, num_classes=0), "resnet18", 32, None, None, pretrained=False
    )
    with pytest.raises(IncompatibleBackboneError, match="ResNet"):
        make_learner("ease", resnet, scenario, runtime)


# -------------------------------------------------------------------- Gaussians, alignment
def test_class_statistics_match_torch_cov_and_samples_reproduce_them():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(23, 3, generator=gen) * torch.tensor([1.0, 2.0, 0.5]) + 1
    labels = torch.tensor([5] * 10 + [6] * 12 + [7])  # unequal counts, one class with a single sample
    perm = torch.randperm(23, generator=gen)
    means, covs = class_statistics(feats[perm], labels[perm], range(5, 8))
    assert means.dtype == covs.dtype == torch.float64 and covs.shape == (3, 3, 3)
    for k, c in enumerate((5, 6)):
        x = feats[labels == c].double()
        torch.testing.assert_close(means[k], x.mean(0))
        torch.testing.assert_close(covs[k], torch.cov(x.T) + 1e-4 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(covs[2], 1e-4 * torch.eye(3, dtype=torch.float64))  # single sample: shrink only

    store = ClassGaussians(3)
    store.grow(2)
    store.grow(3)
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    x = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0, 3.0]), cov).sample((4000,))
    store.update(torch.cat([x, x[:50] * 0]), torch.tensor([2] * 4000 + [1] * 50), range(1, 3))
    assert store.means.shape == (3, 3) and store.covs.shape == (3, 3, 3) and not store.means[0].any()
    samples, y = store.sample(20000, classes=range(2, 3), mean_scale=torch.tensor([0.5]))
    assert samples.shape == (20000, 3) and samples.dtype == torch.float32 and torch.equal(y, torch.full((20000,), 2))
    torch.testing.assert_close(samples.mean(0), 0.5 * store.means[2].float(), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T.double()), store.covs[2], atol=0.06, rtol=0)
    both, y2 = store.sample(5, classes=range(1, 3))
    assert both.shape == (10, 3) and y2.tolist() == [1] * 5 + [2] * 5


def test_logit_normalisation_and_mean_scaling_by_hand():
    logits = torch.tensor([[3.0, 4.0, 0.0, 5.0, 0.0], [1.0, 0.0, 0.0, 2.0, 0.0]])
    blocks = torch.tensor([0, 0, 1, 1, 1])
    # sample 0: block norms 5 and 5 -> mean 5; sample 1: norms 1 and 2 -> mean 1.5; then / tau = 0.1
    expected = torch.tensor([[6.0, 8.0, 0.0, 10.0, 0.0], [1 / 0.15, 0.0, 0.0, 2 / 0.15, 0.0]])
    torch.testing.assert_close(session_normalized_logits(logits, blocks, 0.1), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        mean_scale(torch.tensor([0, 1, 2]), 2), torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0], dtype=torch.float64)
    )


def test_true_session_vs_reference_mapping_on_an_unequal_split():
    scenario = make_scenario(70, 50, 10)  # B50Inc10-like: sessions of 50, 10, 10 classes
    t1 = scenario.sessions[1]
    true = mean_scale_sessions(scenario, t1)
    ref = mean_scale_sessions(scenario, t1, reference=True)
    assert true.tolist() == [0] * 50 + [1] * 10
    assert ref.tolist() == [c // 10 for c in range(60)]
    assert ref[55] == 5 and float(mean_scale(ref, 1)[55]) == pytest.approx(1.2)  # the reference's bug
    assert float(mean_scale(true, 1)[55]) == pytest.approx(1.0)
    assert float(mean_scale(true, 1)[0]) == pytest.approx(0.95)
    t2 = scenario.sessions[2]
    assert mean_scale_sessions(scenario, t2).tolist() == [0] * 50 + [1] * 10 + [2] * 10
    # With equal sessions both mappings agree.
    equal = make_scenario(30, 10, 10)
    last = equal.sessions[2]
    assert torch.equal(mean_scale_sessions(equal, last), mean_scale_sessions(equal, last, reference=True))


def test_alignment_corrects_a_head_biased_towards_the_newest_session():
    runtime = make_runtime(device="cpu", progress=False)
    torch.manual_seed(0)
    d, c = 16, 6
    means = torch.zeros(c, d)
    means[torch.arange(c), torch.arange(c)] = 3.0
    means += 2.0
    store = ClassGaussians(d)
    store.grow(c)
    store.update(
        means.repeat_interleave(50, 0) + 0.3 * torch.randn(c * 50, d), torch.arange(c).repeat_interleave(50), range(c)
    )
    head = torch.nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(means - means.mean(0))
        head.bias.zero_()
        head.bias[4:] = 10.0
    x, y = store.sample(200)
    with torch.no_grad():
        before = (head(x).argmax(1) == y).float().mean()
    sessions = torch.tensor([0, 0, 1, 1, 2, 2])
    losses = align_classifier(
        head,
        store,
        sessions,
        sessions,
        current_session=2,
        epochs=3,
        optimizer=partial(SGD, lr=0.01, momentum=0.9, weight_decay=5e-4),
        runtime=runtime,
        scheduler=partial(CosineAnnealingLR, T_max=3),
    )
    with torch.no_grad():
        after = (head(x).argmax(1) == y).float().mean()
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert before < 0.5 and after > 0.95


# ------------------------------------------------------------------------------- SLCA
def test_slca_stage1_freezes_old_heads_and_evaluates_with_aligned_copies(monkeypatch):
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner("slca", tiny_vit(), scenario, runtime, epochs=1, batch_size=16)
    seen = []
    original = slca_module.train_epochs

    grads = []  # at every optimiser step: (old heads' grads, new head's grad)

    def recording(batches, epochs, loss_fn, optimizer, runtime, scheduler=None, desc="train"):
        seen.append(([g["lr"] for g in optimizer.param_groups], optimizer.defaults, scheduler.milestones))
        optimizer.register_step_pre_hook(
            lambda *_: grads.append(
                ([p.grad for h in learner.heads[:-1] for p in h.parameters()], learner.heads[-1].weight.grad)
            )
        )
        return original(batches, epochs, loss_fn, optimizer, runtime, scheduler, desc)

    monkeypatch.setattr(slca_module, "train_epochs", recording)
    fit(learner, pipeline, scenario.sessions[0])
    head0 = {k: v.clone() for k, v in learner.heads[0].state_dict().items()}
    torch.testing.assert_close(learner.aligned_weight, learner.heads[0].weight.detach())  # T = 0: no alignment
    block_before = learner.backbone.vit.blocks[0].mlp.fc1.weight.detach().clone()

    grads.clear()
    fit(learner, pipeline, scenario.sessions[1])
    lrs, defaults, milestones = seen[-1]
    assert lrs == pytest.approx([1e-4, 1e-2]) and defaults["momentum"] == 0.9 and defaults["weight_decay"] == 5e-4
    assert dict(milestones) == {18: 1}
    # Stage 1: no gradient reached the old head; the new head and the whole backbone trained.
    assert grads and all(old == [None, None] and new is not None for old, new in grads)  # bias, weight
    assert not any(p.requires_grad for p in learner.heads[0].parameters())
    assert all(torch.equal(v, head0[k]) for k, v in learner.heads[0].state_dict().items())
    assert not torch.equal(learner.backbone.vit.blocks[0].mlp.fc1.weight, block_before)
    assert learner.trainable_parameters == learner.backbone.num_parameters() + 48 * 2 + 2
    # Statistics of all 4 classes; evaluation uses the aligned copy, the stage-1 heads stay as they were.
    assert learner.stats.covs.shape == (4, 48, 48) and learner.stats.means[2:].abs().sum() > 0
    stage1 = torch.cat([h.weight for h in learner.heads]).detach()
    assert not torch.allclose(learner.aligned_weight, stage1)
    batch = next(iter(pipeline.batches(TEST, range(4), 32)))
    with torch.no_grad():
        feats = learner.backbone(batch.images)
        torch.testing.assert_close(learner.predict(batch), feats @ learner.aligned_weight.T + learner.aligned_bias)
    # A checkpoint (unfrozen backbone: saved in full) restores the same predictions.
    state = learner.state_dict()
    assert any(k.startswith("backbone.") for k in state) and "stats.covs" in state
    fresh = make_learner("slca", tiny_vit(seed=1), scenario, runtime)
    fresh.restore(state, 2)
    fresh.eval()
    assert torch.equal(fresh.predict(batch), learner.predict(batch))


def tiny_resnet() -> Backbone:
    """A tiny randomly initialised timm ResNet (with BatchNorm) as a 32 px backbone."""
    return Backbone(
        timm.create_model("test_resnet", pretrained=False, num_classes=0),
        "test_resnet",
        32,
        None,
        None,
        pretrained=False,
    )


def test_slca_runs_on_a_cnn_with_batchnorm_in_train_mode():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    torch.manual_seed(0)
    resnet = tiny_resnet()
    learner = make_learner("slca", resnet, scenario, runtime, epochs=1, batch_size=32, freeze_batchnorm_stats=False)
    bn = resnet.model.bn1
    running = bn.running_mean.clone()
    fit(learner, pipeline, scenario.sessions[0])
    assert not torch.equal(bn.running_mean, running)  # stage 1 trained in train mode
    assert not resnet.training
    # Class statistics come from the backbone in eval mode.
    feats, labels = extract_features(resnet, pipeline.batches(TRAIN, range(2), 32), runtime)
    torch.testing.assert_close(
        learner.stats.means[:2].float(), class_means(feats, labels, range(2)), rtol=1e-4, atol=1e-5
    )
    logits = learner.predict(next(iter(pipeline.batches(TEST, range(2), 16))))
    assert logits.shape == (16, 2) and torch.isfinite(logits).all()


def test_slca_can_keep_batchnorm_statistics_fixed():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    torch.manual_seed(0)
    resnet = tiny_resnet()
    learner = make_learner("slca", resnet, scenario, runtime, epochs=1, batch_size=32, freeze_batchnorm_stats=True)
    bn = resnet.model.bn1
    running, weight = bn.running_mean.clone(), bn.weight.detach().clone()
    fit(learner, pipeline, scenario.sessions[0])
    torch.testing.assert_close(bn.running_mean, running, rtol=0, atol=0)  # statistics fixed
    assert not torch.equal(bn.weight, weight)  # the affine weights still train


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["ease", "slca"])
def test_three_sessions_through_hydra(tmp_path, fast, method):
    run_dir = tmp_path / "run"
    table = run_config(
        fast + [f"+method={method}", "scenario=b0inc2", "dataset.num_classes=6", "method.epochs=1"], run_dir
    )
    sessions = pd.read_csv(run_dir / "sessions.csv")
    assert len(sessions) == 3 and sessions["n_seen"].tolist() == [2, 4, 6]
    assert (sessions["method"] == method).all()
    np.testing.assert_allclose(sessions["acc"], table["acc"], atol=1e-4)
    assert sessions["acc"].between(0, 100).all() and sessions["acc_top5"].between(0, 100).all()
    params = sessions["params_trainable"].tolist()
    if method == "ease":
        # a fresh 6-block adapter set (48 -> 64 -> 48) and the proxy head over 2 classes (+ sigma)
        assert params == [6 * (48 * 64 + 64 + 64 * 48 + 48) + 2 * 48 + 1] * 3
        assert (sessions["params_total"].diff().iloc[1:] == 6 * (48 * 64 + 64 + 64 * 48 + 48)).all()
        assert sessions["acc"].iloc[-1] > 40  # frozen tiny ViT on separable classes (SimpleCIL-like)
    else:
        # the whole backbone + the new head (2 x 48 + 2); one head more in total per session
        assert params == [sessions["params_total"].iloc[0]] * 3
        assert sessions["params_total"].diff().iloc[1:].tolist() == [98, 98]
