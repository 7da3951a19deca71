"""FOSTER: class-balanced weights, the boosting and compression losses against closed forms, the teacher's
structure, oofc=az and weight aligning, what is evaluated and checkpointed, and a resumed run."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_ease_slca import fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TRAIN
from pilot.learners.foster import BoostedTeacher, balanced_kd_loss, class_balanced_weights
from pilot.learners.replay import kd_loss

TINY = {"init_epochs": 1, "epochs": 1, "compression_epochs": 1, "memory_per_class": 4, "batch_size": 16}


def test_class_balanced_weights_are_effective_numbers_scaled_to_the_class_count():
    counts, beta = [20, 20, 500, 480], 0.96
    raw = [(1 - beta) / (1 - beta**n) for n in counts]  # 1 / effective number (1 - beta^n) / (1 - beta)
    expected = torch.tensor([r / sum(raw) * len(raw) for r in raw])
    weights = class_balanced_weights(counts, beta)
    torch.testing.assert_close(weights, expected)
    assert float(weights.sum()) == pytest.approx(4.0) and weights[0] > 1 > weights[2]  # old classes weigh more
    assert torch.equal(class_balanced_weights([7, 7, 7], 0.5), torch.ones(3))


def test_balanced_kd_loss_reweights_the_teacher_distribution():
    gen = torch.Generator().manual_seed(0)
    z, zt = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    w, T = torch.tensor([0.5, 1.0, 2.0, 0.5]), 2.0
    expected = 0.0
    for b in range(3):
        q = [math.exp(float(zt[b, c]) / T) * float(w[c]) for c in range(4)]
        log_p = F.log_softmax(z[b] / T, dim=0)
        expected -= sum(q[c] / sum(q) * float(log_p[c]) for c in range(4)) / 3
    assert float(balanced_kd_loss(z, zt, w, T)) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(balanced_kd_loss(z, zt, torch.ones(4), T), kd_loss(z, zt, T))  # w = 1: plain KD


@pytest.fixture(scope="module")
def after_session_zero():
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup(num_classes=4, init_cls=2, increment=2)
    learner = make_learner("foster", tiny_vit(), scenario, runtime, **TINY)
    fit(learner, pipeline, scenario.sessions[0])
    state = {k: v.clone() for k, v in learner.state_dict().items()}  # tests below change the learner
    return learner, scenario, pipeline, state


def test_teacher_structure_and_boosting_losses_against_a_direct_computation(after_session_zero):
    learner, scenario, pipeline, _ = after_session_zero
    learner.begin_session(scenario.sessions[1])
    learner.train()
    head, dim = learner.head, 48
    teacher = learner.teacher = BoostedTeacher(learner.backbone, head, 2, 4)
    teacher.train()
    assert not teacher.old_backbone.training and not any(p.requires_grad for p in teacher.old_backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.new_backbone.parameters(), learner.backbone.parameters()))
    assert teacher.fc.weight.shape == (4, 2 * dim) and teacher.fe_fc.weight.shape == (4, dim)
    assert torch.equal(teacher.fc.weight[:2, :dim], head.weight[:2]) and torch.equal(teacher.fc.bias[:2], head.bias[:2])
    assert teacher.fc.weight[2:].abs().max() <= math.sqrt(3 / (2 * dim))  # PILOT's SimpleLinear draw
    assert torch.equal(teacher.fc.bias[2:], torch.zeros(2)) and torch.equal(teacher.old_fc.weight, head.weight[:2])

    session = pipeline.session(scenario.sessions[1])
    counts = learner.class_counts(session)
    assert counts == [4, 4, 16, 16]  # memory per class for old classes, training images of new ones
    weights = class_balanced_weights(counts, 0.96)
    batch = next(iter(pipeline.batches(TRAIN, range(4), 12, shuffle=True)))
    terms = learner.boosting_losses(batch, weights)
    with torch.no_grad():
        f, y = learner.backbone(batch.images), batch.labels
        logits = torch.cat([f, f], 1) @ teacher.fc.weight.T + teacher.fc.bias  # f_new = f_old at the start
        clf = -F.log_softmax(logits / weights, 1)[torch.arange(12), y].mean()
        fe = -F.log_softmax(f @ teacher.fe_fc.weight.T + teacher.fe_fc.bias, 1)[torch.arange(12), y].mean()
        old = f @ head.weight[:2].T + head.bias[:2]
        kd = -(F.softmax(old / 2, 1) * F.log_softmax(logits[:, :2] / 2, 1)).sum() / 12
    torch.testing.assert_close(terms["clf"], clf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["fe"], fe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("evaluate_with", ["teacher", "student"])
def test_az_weight_align_compression_and_what_is_evaluated(after_session_zero, evaluate_with):
    learner, scenario, pipeline, state = after_session_zero
    runtime = learner.runtime
    variant = {"oofc": "az", "teacher_weight_align": True, "student_weight_align": True, "wa_value": 0.9}
    learner = make_learner("foster", tiny_vit(), scenario, runtime, **TINY, **variant, evaluate_with=evaluate_with)
    learner.restore(state, 1)
    fit(learner, pipeline, scenario.sessions[1])
    teacher, head, dim = learner.teacher, learner.head, 48
    assert torch.equal(teacher.fc.weight[2:, :dim], torch.zeros(2, dim))  # az: zero, and no gradient moved it
    for layer in (teacher.fc, head):  # weight aligning: mean new-row norm = mean old-row norm x 0.9^(2/2)
        norms = layer.weight.norm(dim=1)
        assert float(norms[2:].mean()) == pytest.approx(float(norms[:2].mean()) * 0.9, rel=1e-5)

    batch = next(iter(pipeline.batches(TRAIN, range(4), 10)))
    w2 = class_balanced_weights([4, 4, 16, 16], 0.97)
    with torch.no_grad():
        target = teacher(batch.images)[0]
        expected = balanced_kd_loss(head(learner.backbone(batch.images)), target, w2, 2.0)
        torch.testing.assert_close(learner.compression_loss(batch, w2), expected)
        logits = learner.predict(batch)
        if evaluate_with == "teacher":  # PILOT: the boosted network, its features for herding and NME
            torch.testing.assert_close(logits, target)
            assert learner.memory.class_means.shape == (4, 2 * dim)
        else:
            torch.testing.assert_close(logits, head(learner.backbone(batch.images)))
            assert learner.memory.class_means.shape == (4, dim)
    saved = learner.state_dict()
    assert not any(k.startswith("teacher.") for k in saved)  # the student (and memory) continue the run
    assert any(k.startswith("backbone.") for k in saved) and saved["head.weight"].shape == (4, dim)


def test_foster_resumes_identically(fast, tmp_path):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides("foster"), tmp_path)
    memory = pd.read_csv(tmp_path / "full" / "memory.csv")  # after the last session
    assert memory.groupby("class").size().to_dict() == {0: 16, 1: 16, 2: 16, 3: 16}  # 20 per class, 16 images
    assert memory.groupby("class")["rank"].max().tolist() == [15] * 4 and memory["sample_id"].is_unique
    learner_state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["learner"]
    assert not any(k.startswith("teacher.") for k in learner_state)
