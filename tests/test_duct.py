"""DUCT: task-vector merging, Sinkhorn plans, classifier transport, the session mechanics, a resumed run."""

from __future__ import annotations

import math

import pytest
import torch
from test_ease_slca import fit, tiny_resnet, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TEST, TRAIN
from pilot.learners import duct as duct_module
from pilot.modules.classifiers import class_means
from pilot.modules.features import extract_features
from pilot.modules.merging import add_task_vector, flatten, floating_state, sinkhorn, transport_classifier


# ---------------------------------------------------------------------------------- formulas
def test_task_vectors_accumulate_on_the_pretrained_weights():
    pre = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.0])}
    tuned = [
        {"w": torch.tensor([2.0, -2.0, 1.5]), "b": torch.tensor([1.0])},
        {"w": torch.tensor([0.0, 2.0, 0.5]), "b": torch.tensor([-3.0])},
    ]
    scales = [0.25 * 0.9, 0.25 * 0.5]
    merged = dict(pre)
    for theta, s in zip(tuned, scales):
        merged = {k: add_task_vector(merged[k], theta[k], pre[k], s) for k in pre}
    # theta* = theta_0 + sum_t lambda s_t (theta_t - theta_0)
    torch.testing.assert_close(merged["w"], torch.tensor([1 + 0.225 * 1 + 0.125 * -1, -2 + 0.125 * 4, 0.5 + 0.225 * 1]))
    torch.testing.assert_close(merged["b"], torch.tensor([0.225 * 1 + 0.125 * -3]))


def test_sinkhorn_on_a_known_case_and_its_marginals():
    # symmetric 2 x 2: by symmetry u = v, so the plan is c K with rows summing to 1/2
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    p = 0.5 / (1 + math.exp(-1))  # 0.36552929 (POT's documented example)
    torch.testing.assert_close(
        sinkhorn(half, half, cost, 1.0), torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64)
    )
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    cost = torch.rand(5, 7, generator=gen, dtype=torch.float64)
    plan = sinkhorn(a, b, cost, 0.1)
    torch.testing.assert_close(plan.sum(1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), b, rtol=0, atol=1e-9)
    # small regularisation on a cost with a cheap diagonal: (nearly) the identity matching
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    sharp = sinkhorn(uniform, uniform, 1 - torch.eye(4, dtype=torch.float64), 0.02)
    torch.testing.assert_close(sharp, torch.eye(4, dtype=torch.float64) / 4, rtol=0, atol=1e-12)
    # costs far above reg underflow the kernel: POT keeps the last finite iterate, here the zero plan
    assert torch.equal(sinkhorn(uniform, uniform, 1e3 + cost[:4, :4], 0.02), torch.zeros(4, 4, dtype=torch.float64))


def test_transport_classifier_mixes_in_the_transported_new_rows():
    gen = torch.Generator().manual_seed(1)
    means_new, means_old = torch.randn(3, 6, generator=gen), torch.randn(2, 6, generator=gen)
    w_new, w_old = torch.randn(3, 6, generator=gen), torch.randn(2, 6, generator=gen)
    updated, plan = transport_classifier(w_old, w_new, means_old, means_new, ratio=0.25, reg=0.5)
    cost = torch.cdist(means_new.double(), means_old.double())
    assert plan.shape == (3, 2) and torch.allclose(
        cost, ((means_new[:, None] - means_old[None]) ** 2).sum(-1).sqrt().double()
    )
    torch.testing.assert_close(plan.sum(1), torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), torch.full((2,), 1 / 2, dtype=torch.float64), rtol=0, atol=1e-9)
    # an independent Sinkhorn (alternating row and column scaling to convergence) gives the same plan
    kernel, u = torch.exp(-cost / 0.5), torch.ones(3, dtype=torch.float64)
    for _ in range(2000):
        v = 0.5 / (kernel.T @ u)
        u = (1 / 3) / (kernel @ v)
    torch.testing.assert_close(plan, u[:, None] * kernel * v[None], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(updated, 0.75 * w_old + 0.25 * (plan.T @ w_new.double()).float())


# ---------------------------------------------------------------------------------- learner
def test_sessions_fine_tune_the_pretrained_model_and_merge_task_vectors(monkeypatch):
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner("duct", tiny_vit(), scenario, runtime, epochs=1, batch_size=16, retrain_epochs=1)
    pretrained = flatten(floating_state(learner.backbone))
    seen: dict = {"start": [], "trained": [], "s": [], "before_transport": None}
    lrs: list = []
    original_train, original_similarity = duct_module.train_epochs, learner.similarity
    original_consolidate = learner.consolidate_classifier

    def recording(batches, epochs, loss_fn, optimizer, *args, **kwargs):
        if len(optimizer.param_groups) == 2:  # the fine-tuning of the backbone: it starts from theta_0
            seen["start"].append(flatten(floating_state(learner.backbone)))
        optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(tuple(g["lr"] for g in opt.param_groups)))
        return original_train(batches, epochs, loss_fn, optimizer, *args, **kwargs)

    def similarity(session):
        seen["trained"].append(flatten(floating_state(learner.backbone)))
        seen["s"].append(original_similarity(session))
        return seen["s"][-1]

    def consolidate(info):
        seen["before_transport"] = learner.head.weight.detach().clone()
        original_consolidate(info)

    monkeypatch.setattr(duct_module, "train_epochs", recording)
    monkeypatch.setattr(learner, "similarity", similarity)
    monkeypatch.setattr(learner, "consolidate_classifier", consolidate)
    fit(learner, pipeline, scenario.sessions[0])
    fit(learner, pipeline, scenario.sessions[1])

    assert all(torch.equal(start, pretrained) for start in seen["start"]) and len(seen["start"]) == 2
    s0, s1 = seen["s"]
    assert 0 < s0 <= 1 and 0 < s1 <= 1
    delta0, delta1 = seen["trained"][0] - pretrained, seen["trained"][1] - pretrained
    expected = pretrained + 0.25 * s0 * delta0 + 0.25 * s1 * delta1
    torch.testing.assert_close(flatten(floating_state(learner.backbone)), expected)
    # lr: backbone 0.1 x 0.01 and classifier 0.1, both / 3 (ConstantLR); retraining: the classifier at 0.1 / 3
    assert lrs[0] == pytest.approx((1e-3 / 3, 0.1 / 3)) and lrs[-1] == pytest.approx((0.1 / 3,))
    # theta_0 class means of all 4 classes (test transform), from a fresh copy of the pre-trained model
    feats, labels = extract_features(tiny_vit(), pipeline.batches(TRAIN, range(4), 32), runtime, full_precision=True)
    torch.testing.assert_close(learner.means.float(), class_means(feats, labels, range(4)), rtol=1e-5, atol=1e-5)
    # classifier consolidation of session 0's rows by the new rows, then predictions are sigma * cos
    before = seen["before_transport"]
    expected_old, _ = transport_classifier(before[:2], before[2:], learner.means[:2], learner.means[2:], 0.25, 0.02)
    torch.testing.assert_close(learner.head.weight[:2], expected_old)
    assert torch.equal(learner.head.weight[2:], before[2:])
    batch = next(iter(pipeline.batches(TEST, range(4), 16)))
    with torch.no_grad():
        feats = torch.nn.functional.normalize(learner.backbone(batch.images), dim=1)
        logits = learner.head.sigma * feats @ torch.nn.functional.normalize(learner.head.weight, dim=1).T
    torch.testing.assert_close(learner.predict(batch), logits)
    assert "pretrained" not in learner.state_dict() and "means" in learner.state_dict()


@pytest.mark.parametrize("init, exploded", [("zeros", True), ("uniform", False)])
def test_zero_rows_explode_on_the_first_cosine_step(init, exploded):
    """The reference's zero rows get a 1/eps = 1e12 gradient through the normalisation of the cosine classifier."""
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner(
        "duct", tiny_vit(), scenario, runtime, epochs=1, batch_size=16, retrain_epochs=1, new_row_init=init
    )
    fit(learner, pipeline, scenario.sessions[0])
    norms_before = learner.head.weight[:2].norm(dim=1).max()
    learner.similarity_scaled_merge = False
    fit(learner, pipeline, scenario.sessions[1])
    assert (learner.head.weight[2:].norm(dim=1).min() > 1e6) == exploded
    assert norms_before < 10


def test_a_cnn_merges_its_batchnorm_statistics_as_task_vectors(monkeypatch):
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    torch.manual_seed(0)
    resnet = tiny_resnet()
    learner = make_learner("duct", resnet, scenario, runtime, epochs=1, batch_size=32, retrain_epochs=1)
    bn = resnet.model.bn1
    pretrained_mean = bn.running_mean.clone()
    seen = []
    original = learner.similarity

    def similarity(session):  # called between fine-tuning and the merge
        seen.append((bn.running_mean.clone(), original(session)))
        return seen[-1][1]

    monkeypatch.setattr(learner, "similarity", similarity)
    fit(learner, pipeline, scenario.sessions[0])
    trained, s = seen[0]
    assert not torch.equal(trained, pretrained_mean)  # fine-tuning updated the statistics (train mode)
    # merged like the weights; the retraining (backbone in eval mode) left them as merged
    torch.testing.assert_close(bn.running_mean, pretrained_mean + 0.25 * s * (trained - pretrained_mean))
    logits = learner.predict(next(iter(pipeline.batches(TEST, range(2), 16))))
    assert logits.shape == (16, 2) and torch.isfinite(logits).all()


def test_two_sessions_resume_identically(tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides("duct"), tmp_path)
