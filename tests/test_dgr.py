"""DGR (pilot/learners/dgr.py, pilot/modules/distillation.py): the reweighting formulas against a direct
computation of PILOT's ``models/dgr.py`` rules in numpy, the loss terms against closed forms, the head
and backbone gradients of real training steps recomputed in the test, the class counts of the prior and
DAKD's lost images, and the learner end to end on the tiny ViT with resume."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config, small_overrides
from test_registry import TWO_SESSIONS, assert_resumes_identically

from pilot.api import make_learner
from pilot.config import build
from pilot.data.pipeline import TRAIN, Batch
from pilot.data.scenario import make_scenario
from pilot.learners.dgr import DGR, class_balance_weights, distillation_scale
from pilot.learners.replay import kd_loss
from pilot.loop import build_data, build_model
from pilot.modules.distillation import dakd_loss, logit_adjusted_cross_entropy, normalized_entropy
from pilot.runtime import Runtime

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)
DGR_RUN = [*TWO_SESSIONS, *small_overrides("dgr"), "method.memory_size=24", "dataset.noise=150"]


def tiny_dgr(per_session: int = 2, **settings) -> DGR:
    torch.manual_seed(0)
    backbone = build(compose_config(FAST).backbone)
    scenario = make_scenario(2 * per_session, per_session, per_session, class_order="natural")
    learner = make_learner("dgr", backbone, scenario, CPU, **settings)
    assert isinstance(learner, DGR)
    return learner


def batch(labels: list[int], seed: int) -> Batch:
    images = torch.rand(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return Batch(images, lambda x: x, torch.tensor(labels), torch.arange(len(labels)), "train", True, len(labels))


class Recording(torch.optim.SGD):
    """SGD with lr 0 (the weights stay) that keeps every gradient it is asked to apply."""

    grads: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        Recording.grads.append({str(id(p)): p.grad.clone() for g in self.param_groups for p in g["params"]})


def recorded_steps(
    learner: DGR, batches: list[Batch], counts: list[float], lost: torch.Tensor | None = None
) -> list[dict[str, torch.Tensor]]:
    Recording.grads = []
    opt = lambda params: Recording(params, lr=0.0)  # noqa: E731
    learner.train_reweighted(batches, torch.tensor(counts, dtype=torch.float64), lost, opt, None, 1)
    return Recording.grads


# ------------------------------------------------------------------------------- formulas
def pilot_weights(grad_norms: list[np.ndarray], known: int, gamma_r: float) -> np.ndarray:
    """PILOT's rule, step by step as models/dgr.py writes it (numpy float64)."""
    gradall = np.zeros(len(grad_norms[0]))
    for norms in grad_norms:
        gradall += norms
    if known == 0:
        return np.min(gradall) / gradall
    old, new = gradall[:known], gradall[known:]
    w = np.concatenate([np.min(old) / old, np.min(new) / new])
    rs_old = min(1.0, np.mean(new) / np.mean(old))
    rs_new = min(1.0, np.mean(new) / np.mean(old) * np.exp(-gamma_r * known / len(gradall)))
    w[:known] *= rs_old
    w[known:] *= rs_new
    return w


@pytest.mark.parametrize("known, scale_new", [(0, 1.0), (3, 1.0), (3, 0.2), (2, 5.0)])
def test_class_balance_weights_are_pilots(known, scale_new):
    rng = np.random.default_rng(known)
    steps = [rng.uniform(0.1, 2.0, 6) * np.r_[np.ones(known), np.full(6 - known, scale_new)] for _ in range(3)]
    ours = class_balance_weights(torch.tensor(sum(steps)), known, 0.7).numpy()
    np.testing.assert_allclose(ours, pilot_weights(steps, known, 0.7), rtol=1e-12)
    if known == 0:
        assert ours.max() == 1.0 and ours.min() > 0  # the class with the least accumulated gradient keeps 1


def test_distillation_scale_balances_the_norms_and_is_zero_without_a_kd_gradient():
    alpha, ce, kd = torch.tensor([0.5, 1.0, 0.25]), torch.tensor([2.0, 1.0, 4.0]), torch.tensor([3.0, 4.0])
    assert float(distillation_scale(alpha, ce, kd)) == pytest.approx(math.sqrt(1 + 1 + 1) / 5)
    assert float(distillation_scale(alpha, ce, torch.zeros(2))) == 0.0


def test_logit_adjusted_cross_entropy_is_ce_on_logits_plus_log_prior():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    y, counts = torch.tensor([0, 2]), torch.tensor([20.0, 500.0, 100.0])
    shifted = z.numpy() + np.log(counts.numpy() / 620.0)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = -(log_p[0, 0] + log_p[1, 2]) / 2
    assert logit_adjusted_cross_entropy(z, y, counts).item() == pytest.approx(expected, rel=1e-6)
    uniform = logit_adjusted_cross_entropy(z, y, torch.full((3,), 7.0))
    assert uniform.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)  # a uniform prior shifts nothing


def test_dakd_closed_form_and_equal_losses_reduce_to_kd():
    gen = torch.Generator().manual_seed(3)
    z, z_old, T = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen), 2.0
    lost = torch.tensor([40.0, 10.0, 0.0], dtype=torch.float64)
    p = (lost.numpy() + 0.001) / (lost.numpy() + 0.001).sum()
    rho = -(p * np.log(p)).sum() / np.log(3)
    assert normalized_entropy(lost) == pytest.approx(rho, rel=1e-12)
    prior = lost.numpy() / 50.0
    prior = prior / np.linalg.norm(prior)
    mixed = prior * z.numpy() + (1 - prior) * z_old.numpy()

    def log_softmax(a: np.ndarray) -> np.ndarray:
        return a / T - np.log(np.exp(a / T).sum(1, keepdims=True))

    q = np.exp(log_softmax(z_old.numpy()))
    expected = -(q * (rho * log_softmax(z.numpy()) + (1 - rho) * log_softmax(mixed))).sum() / 5
    assert dakd_loss(z, z_old, lost, T).item() == pytest.approx(expected, rel=1e-6)
    equal = torch.full((3,), 480.0)
    assert normalized_entropy(equal) == pytest.approx(1.0, abs=1e-12)
    assert dakd_loss(z, z_old, equal, T).item() == pytest.approx(kd_loss(z, z_old, T).item(), rel=1e-7)


# ------------------------------------------------------------------------------ training steps
def test_session_zero_head_gradients_are_reweighted_by_accumulated_norms():
    learner = tiny_dgr(per_session=3)  # with two classes both CE rows have the same norm: alpha = 1
    learner.begin_session(learner.scenario.sessions[0])
    head, counts = learner.head, [30.0, 10.0, 20.0]
    batches = [batch([0, 0, 2, 1], 1), batch([0, 1, 1, 0, 2], 2)]
    steps = recorded_steps(learner, batches, counts)
    accumulated = torch.zeros(3, dtype=torch.float64)
    for x, step in zip(batches, steps):  # lr 0: every step sees the same weights
        feats = learner.backbone(x.images)
        ce = F.cross_entropy(head(feats) + torch.log(torch.tensor(counts) / 60), x.labels)
        g_w, g_b, *g_backbone = torch.autograd.grad(ce, [head.weight, head.bias, *learner.backbone.parameters()])
        accumulated += g_w.norm(dim=1).double()
        alpha = (accumulated.min() / accumulated).float()
        assert alpha.min() < 1.0 and alpha.max() == 1.0
        torch.testing.assert_close(step[str(id(head.weight))], alpha[:, None] * g_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(step[str(id(head.bias))], alpha * g_b, rtol=1e-5, atol=1e-7)
        for p, g in zip(learner.backbone.parameters(), g_backbone):  # the backbone keeps the plain gradient
            torch.testing.assert_close(step[str(id(p))], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("distillation", ["kd", "dakd"])
def test_later_session_gradients_balance_old_new_and_distillation(distillation):
    learner = tiny_dgr(kd_lambda=0.5, gamma_r=1.0, distillation=distillation)
    learner.begin_session(learner.scenario.sessions[0])
    learner.begin_session(learner.scenario.sessions[1])
    other = learner.previous_network()  # a previous network that differs from the current one
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    learner.previous_network = lambda: other  # type: ignore[method-assign]
    head, counts, known = learner.head, [3.0, 3.0, 30.0, 20.0], 2
    batches = [batch([0, 2, 3, 2], 4), batch([1, 3, 2, 2, 0], 5)]
    lost = torch.tensor([40.0, 10.0], dtype=torch.float64)
    steps = recorded_steps(learner, batches, counts, lost)
    accumulated = torch.zeros(4, dtype=torch.float64)
    for x, step in zip(batches, steps):
        feats = learner.backbone(x.images)
        logits = head(feats)
        ce = F.cross_entropy(logits + torch.log(torch.tensor(counts) / 39), x.labels)
        with torch.no_grad():
            old = other(x.images)[:, :known]
        kd = (
            kd_loss(logits[:, :known], old, 2.0)
            if distillation == "kd"
            else dakd_loss(logits[:, :known], old, lost, 2.0)
        )
        g_ce = torch.autograd.grad(ce, [head.weight, head.bias], retain_graph=True)
        g_kd = torch.autograd.grad(kd, [head.weight, head.bias], retain_graph=True)
        ce_norms = g_ce[0].norm(dim=1).double()
        accumulated += ce_norms
        phi_old, phi_new = accumulated[:known], accumulated[known:]
        r = float(phi_new.mean() / phi_old.mean())
        alpha = torch.cat(
            [phi_old.min() / phi_old * min(1.0, r), phi_new.min() / phi_new * min(1.0, r * math.exp(-known / 4))]
        )
        beta = float((alpha * ce_norms).norm() / g_kd[0][:known].norm(dim=1).double().norm())
        expected_w = alpha.float()[:, None] * g_ce[0] + beta * g_kd[0]
        expected_b = alpha.float() * g_ce[1] + beta * g_kd[1]
        assert g_kd[0][known:].abs().max() == 0  # the distillation gradient reaches old rows only
        torch.testing.assert_close(step[str(id(head.weight))], expected_w, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(step[str(id(head.bias))], expected_b, rtol=1e-4, atol=1e-7)
        # the backbone: the gradient of CE + lambda K / (N - K) KD (here 0.5 * 2 / 2)
        blocks = learner.backbone.model.blocks[-1].mlp.fc2.weight
        (g_block,) = torch.autograd.grad(ce + 0.5 * kd, [blocks])
        torch.testing.assert_close(step[str(id(blocks))], g_block, rtol=1e-4, atol=1e-6)


def test_previous_network_equal_to_the_current_one_adds_no_distillation_to_the_head():
    learner = tiny_dgr()
    learner.begin_session(learner.scenario.sessions[0])
    learner.begin_session(learner.scenario.sessions[1])
    head, x, counts = learner.head, batch([0, 3, 2, 1], 6), [3.0, 3.0, 30.0, 20.0]
    (step,) = recorded_steps(learner, [x], counts)
    ce = F.cross_entropy(head(learner.backbone(x.images)) + torch.log(torch.tensor(counts) / 56), x.labels)
    g_w = torch.autograd.grad(ce, head.weight)[0]
    norms = g_w.norm(dim=1).double()
    r = float(norms[2:].mean() / norms[:2].mean())
    alpha = torch.cat(
        [norms[:2].min() / norms[:2] * min(1, r), norms[2:].min() / norms[2:] * min(1, r * math.exp(-0.5))]
    )
    torch.testing.assert_close(step[str(id(head.weight))], alpha.float()[:, None] * g_w, rtol=1e-4, atol=1e-7)


def test_prior_counts_and_dakd_lost_images_come_from_the_data_and_the_memory():
    cfg = compose_config(FAST + DGR_RUN + ["method.distillation=dakd"])
    model = build_model(cfg, build_data(cfg))
    learner, pipeline = model.learner, model.pipeline
    learner.fit(pipeline.session(learner.scenario.sessions[0]))
    seen = {}
    learner.train_reweighted = lambda batches, counts, lost, *a: seen.update(counts=counts, lost=lost)
    learner.fit(pipeline.session(learner.scenario.sessions[1]))
    labels = pipeline.labels(TRAIN)
    per_class = [len(pipeline.indices(TRAIN, range(c, c + 1))) for c in range(4)]
    assert seen["counts"].tolist() == [12, 12, per_class[2], per_class[3]]  # memory: 24 // 2 per old class
    assert seen["lost"].tolist() == [per_class[0] - 12, per_class[1] - 12]
    assert (labels[learner.memory.ids()] == np.repeat(np.arange(4), 6)).all()  # then reduced to 24 // 4


# ------------------------------------------------------------------------------------ end to end
def test_dgr_runs_resumes_and_reports_nme(tmp_path):
    assert_resumes_identically(FAST + DGR_RUN, tmp_path)
    full = pd.read_csv(tmp_path / "full" / "sessions.csv")
    assert full["acc_nme"].between(0, 100).all() and full["acc_nme"].notna().all()
    memory = pd.read_csv(tmp_path / "full" / "memory.csv")
    assert memory.groupby("class").size().to_dict() == {0: 6, 1: 6, 2: 6, 3: 6}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "memory.csv"), memory)
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["learner"]
    assert state["head.weight"].shape[0] == 4 and any(k.startswith("backbone.") for k in state)
    assert not any(k.startswith(("previous", "old")) for k in state)  # the previous network is not kept
