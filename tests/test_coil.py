"""COIL: transport plans against a direct Sinkhorn (marginals, unequal masses), the prospective and
retrospective classifiers against direct computations, the loss terms and their weights, the refresh
schedule of the retrospective transport, and a resumed run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_ease_slca import fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TRAIN
from pilot.learners.coil import cosine_logits, transport_plan

TINY = {"epochs": 1, "memory_size": 24, "batch_size": 16}  # 12 exemplars per class after session 0


def direct_sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float) -> torch.Tensor:
    """Alternating scaling to convergence (float64): ``diag(u) exp(-C / reg) diag(v)`` with row sums ``a``."""
    kernel, u = torch.exp(-cost / reg), torch.ones_like(a)
    for _ in range(5000):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def normalised_means(feats: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    unit = feats.double() / (feats.double().norm(dim=1, keepdim=True) + 1e-8)
    return F.normalize(torch.stack([unit[labels == c].mean(0) for c in classes]), dim=1)


def test_transport_plan_is_sinkhorn_on_the_minkowski_cost_with_the_reference_marginals():
    gen = torch.Generator().manual_seed(0)
    src, tgt = (
        F.normalize(torch.randn(4, 6, generator=gen), dim=1),
        F.normalize(torch.randn(4, 6, generator=gen), dim=1),
    )
    plan = transport_plan(src, tgt, 0.25, 3.0, 0.464)
    cost = torch.cdist(src.double(), tgt.double(), p=3.0)
    quarter = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(plan, direct_sinkhorn(quarter, quarter, cost, 0.464), rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(1), quarter, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.sum(0), quarter, rtol=0, atol=1e-9)
    # 6 old classes, 3 new ones, every entry 1/6 (PILOT's marginals): the masses differ (1 vs 1/2); the
    # plan is the one with the new marginal rescaled to 1/3, rows summing to 1/6
    src6, tgt3 = (
        F.normalize(torch.randn(6, 6, generator=gen), dim=1),
        F.normalize(torch.randn(3, 6, generator=gen), dim=1),
    )
    plan = transport_plan(src6, tgt3, 1 / 6, 3.0, 0.464)
    sixth, third = torch.full((6,), 1 / 6, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    direct = direct_sinkhorn(sixth, third, torch.cdist(src6.double(), tgt3.double(), p=3.0), 0.464)
    torch.testing.assert_close(plan, direct, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), third, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def after_session_zero():
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup(num_classes=4, init_cls=2, increment=2)
    learner = make_learner("coil", tiny_vit(), scenario, runtime, **TINY)
    fit(learner, pipeline, scenario.sessions[0])
    return learner.state_dict(), scenario, pipeline, runtime


def session_one(after_session_zero, **params):
    state, scenario, pipeline, runtime = after_session_zero
    learner = make_learner("coil", tiny_vit(), scenario, runtime, **{**TINY, **params})
    learner.restore(state, 1)
    learner.begin_session(scenario.sessions[1])
    learner.train()
    return learner, pipeline, pipeline.session(scenario.sessions[1])


def class_means(learner, batches, classes: range) -> torch.Tensor:
    learner.backbone.eval()
    with torch.no_grad():
        pairs = [(learner.backbone(b.images), b.labels) for b in batches]
    learner.backbone.train()
    return normalised_means(torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs]), classes)


def test_prospective_and_retrospective_classifiers_against_a_direct_computation(after_session_zero):
    learner, pipeline, session = session_one(after_session_zero)
    old_rows = learner.head.weight[:2].detach().double().clone()
    assert len(learner.memory) == 24 and torch.equal(learner.head.weight[2:], torch.zeros(2, 48))
    rows = learner.prospective_transport(session)
    mu_old = class_means(learner, session.sample_batches(learner.memory.ids(), 50), range(2))  # exemplars
    mu_new = class_means(learner, pipeline.batches(TRAIN, range(2, 4), 50), range(2, 4))
    half = torch.full((2,), 0.5, dtype=torch.float64)
    plan = direct_sinkhorn(half, half, torch.cdist(mu_old, mu_new, p=3.0), 0.464)
    moved = plan.T @ F.normalize(old_rows, dim=1) * 2
    expected = moved * old_rows.norm(dim=1).mean() / moved.norm(dim=1).mean()  # gamma: equal mean norms
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(learner.head.weight[2:].detach(), rows)
    # PILOT's source of the old means: all the old classes' images (16 each) instead of the 12 exemplars
    all_old = class_means(learner, pipeline.batches(TRAIN, range(2), 50), range(2))
    torch.testing.assert_close(learner.old_means(session, "all_data"), all_old, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(all_old, mu_old, atol=1e-4)

    with torch.no_grad():
        learner.head.weight[2:] += 0.3 * torch.randn(2, 48)  # "trained" new rows
    retro = learner.retrospective_transport(session)
    plan = direct_sinkhorn(half, half, torch.cdist(mu_new, mu_old, p=3.0), 0.464)  # new -> old
    expected = plan.T @ F.normalize(learner.head.weight[2:].detach().double(), dim=1)
    torch.testing.assert_close(F.normalize(retro.double(), dim=1), F.normalize(expected, dim=1), rtol=1e-5, atol=1e-7)


def test_loss_terms_and_weights_against_a_direct_computation(after_session_zero):
    learner, pipeline, _ = session_one(after_session_zero)
    previous = learner.previous_network()
    batch = next(iter(pipeline.batches(TRAIN, range(4), 12, shuffle=True)))
    gen = torch.Generator().manual_seed(1)
    w_new, w_old = torch.randn(2, 48, generator=gen), torch.randn(2, 48, generator=gen)
    with torch.no_grad():
        f = learner.backbone(batch.images)
        z = learner.head(f)
        old = previous(batch.images)[:, :2]
        torch.testing.assert_close(old, z[:, :2])  # the copy is the network as it is at the session start
        kd = -(F.softmax(old / 2, 1) * F.log_softmax(z[:, :2] / 2, 1)).sum() / 12
        ce = F.cross_entropy(z, batch.labels)
        cos_new = F.normalize(f, dim=1) @ F.normalize(w_new, dim=1).T
        cos_old = F.normalize(f, dim=1) @ F.normalize(w_old, dim=1).T
        prospective = -(F.softmax(cos_new / 2, 1) * F.log_softmax(z[:, 2:] / 2, 1)).sum() / 12
        retrospective = -(F.softmax(old / 2, 1) * F.log_softmax(cos_old / 2, 1)).sum() / 12
        torch.testing.assert_close(cosine_logits(f, w_new), cos_new)
        for epoch, transported, term, weight in (
            (0, w_new, prospective, 1e-3),
            (1, w_old, retrospective, 1e-3 * (1 / 4) ** 2),
            (3, w_old, retrospective, 1e-3 * (3 / 4) ** 2),
        ):
            terms = learner.loss_terms(batch, previous, transported, epoch)
            torch.testing.assert_close(terms["kd"], kd)
            torch.testing.assert_close(terms["ce"], ce)
            torch.testing.assert_close(terms["transport"], term)
            expected = 0.5 * kd + 0.5 * ce + weight * term  # lambda = 2 old / 4 seen classes
            torch.testing.assert_close(learner.loss(batch, previous, transported, epoch, 4), expected)


def test_retrospective_transport_is_refreshed_every_n_batches_from_epoch_one(after_session_zero, monkeypatch):
    learner, _, session = session_one(after_session_zero, epochs=3, ot_refresh_every=2, batch_size=20)
    calls, used = [], []
    retro = torch.ones(2, 48)
    monkeypatch.setattr(learner, "retrospective_transport", lambda s: calls.append(1) or retro)
    original = learner.loss

    def loss(batch, previous, transported, epoch, epochs):
        used.append((epoch, transported is retro))
        return original(batch, previous, transported, epoch, epochs)

    monkeypatch.setattr(learner, "loss", loss)
    learner.train_session(session)  # 32 new images + 24 exemplars: 3 batches of 20 per epoch
    assert used == [(0, False)] * 3 + [(1, True)] * 3 + [(2, True)] * 3
    assert len(calls) == 4  # batches 0 and 2 of epochs 1 and 2


def test_coil_resumes_identically(fast, tmp_path):
    overrides = fast + TWO_SESSIONS + small_overrides("coil") + ["++method.epochs=2", "method.ot_refresh_every=1"]
    assert_resumes_identically(overrides, tmp_path)
    sessions = pd.read_csv(tmp_path / "full" / "sessions.csv")
    assert sessions["acc_nme"].between(0, 100).all() and sessions["n_seen"].tolist() == [2, 4]
