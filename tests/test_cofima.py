"""CoFiMA: the merge formulas, the Fisher estimate, the merge after a session, a resumed run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ease_slca import fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.data.pipeline import TEST
from pilot.learners import slca as slca_module
from pilot.modules.merging import diagonal_fisher, fisher_weighted_average, flatten, interpolate


# ---------------------------------------------------------------------------------- formulas
def test_fisher_weighted_average_and_interpolation_of_two_state_dicts():
    old = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -1.0])}
    new = {"w": torch.tensor([[3.0, 0.0], [-1.0, 8.0]]), "b": torch.tensor([1.5, 1.0])}
    f_old = {"w": torch.tensor([[1e-4, 0.0], [2e-5, 0.0]]), "b": torch.tensor([1e-6, 3e-5])}
    f_new = {"w": torch.tensor([[1e-4, 5e-5], [0.0, 0.0]]), "b": torch.tensor([3e-6, 1e-5])}
    a = 0.4
    merged = {k: fisher_weighted_average(old[k], new[k], f_old[k], f_new[k], a) for k in old}
    # element by element: (0.6 F0 x0 + 0.4 F1 x1) / (0.6 F0 + 0.4 F1)
    assert merged["w"][0, 0].item() == pytest.approx((0.6 * 1e-4 * 1 + 0.4 * 1e-4 * 3) / (0.6e-4 + 0.4e-4))
    assert merged["w"][0, 1].item() == pytest.approx(0.0)  # only the new model has information: its value
    assert merged["w"][1, 0].item() == pytest.approx(3.0)  # only the old one: its value
    assert merged["w"][1, 1].item() == pytest.approx(0.6 * 4 + 0.4 * 8)  # neither (0/0): plain interpolation
    b0 = (0.6 * 1e-6 * 0.5 + 0.4 * 3e-6 * 1.5) / (0.6e-6 + 0.4 * 3e-6)
    b1 = (0.6 * 3e-5 * -1 + 0.4 * 1e-5 * 1) / (0.6 * 3e-5 + 0.4e-5)
    torch.testing.assert_close(merged["b"], torch.tensor([b0, b1]))
    torch.testing.assert_close(interpolate(old["w"], new["w"], a), torch.tensor([[1.8, 1.2], [1.4, 5.6]]))
    # equal Fisher values everywhere: the Fisher average is the plain interpolation
    same = torch.full((2, 2), 2e-5)
    torch.testing.assert_close(
        fisher_weighted_average(old["w"], new["w"], same, same, a), interpolate(old["w"], new["w"], a)
    )


def test_diagonal_fisher_of_a_linear_softmax_model_by_hand():
    """Two batches through logits = x W^T + b: the CE gradient is (softmax - onehot)^T x / B per batch."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=gen, requires_grad=True)
    bias = torch.randn(3, generator=gen, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    batches = [
        (torch.randn(5, 4, generator=gen), torch.tensor([0, 2, 1, 1, 0])),
        (torch.randn(3, 4), torch.tensor([2, 2, 0])),
    ]
    losses = (F.cross_entropy(x @ weight.T + bias, y) for x, y in batches)
    f_weight, f_bias, f_unused = diagonal_fisher([weight, bias, unused], losses)

    grads_w, grads_b = [], []
    for x, y in batches:
        residual = torch.softmax(x @ weight.detach().T + bias.detach(), dim=1) - F.one_hot(y, 3).float()
        grads_w.append((residual.T @ x) / len(y))
        grads_b.append(residual.mean(0))
    torch.testing.assert_close(f_weight, (grads_w[0] ** 2 + grads_w[1] ** 2) / 2)
    torch.testing.assert_close(f_bias, (grads_b[0] ** 2 + grads_b[1] ** 2) / 2)
    assert torch.equal(f_unused, torch.zeros(2))  # no loss reaches it
    losses = (F.cross_entropy(x @ weight.T + bias, y) for x, y in batches)
    clipped = diagonal_fisher([weight], losses, max_value=1e-2)[0]
    torch.testing.assert_close(clipped, f_weight.clamp_max(1e-2))
    assert (clipped == 1e-2).any() and (clipped < 1e-2).any()


# ---------------------------------------------------------------------------------- learner
def test_fisher_of_the_learner_is_over_all_seen_classes_and_every_head():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner("cofima", tiny_vit(), scenario, runtime, epochs=1, batch_size=16, ca_epochs=0)
    fit(learner, pipeline, scenario.sessions[0])
    learner.begin_session(scenario.sessions[1])  # two heads: session 0's (frozen) and a new one
    session = pipeline.session(scenario.sessions[1])
    batches = list(session.train_batches(8))
    session.train_batches = lambda *args, **kwargs: batches  # type: ignore[method-assign]
    params, heads = learner.merged_parameters(), list(learner.heads)
    f_backbone, f_weight, f_bias = learner.fisher(session, params, heads)

    head_params = [t for h in heads for t in (h.weight, h.bias)]
    for t in head_params:
        t.requires_grad_(True)
    sums = [torch.zeros_like(p) for p in params + head_params]
    for batch in batches:
        learner.zero_grad(set_to_none=True)
        logits = torch.cat([h(learner.backbone(batch.images)) for h in heads], dim=1)  # 4 classes
        F.cross_entropy(logits, batch.labels).backward()  # labels 2, 3: not shifted
        for total, p in zip(sums, params + head_params):
            total += p.grad**2
    expected = [(s / len(batches)).clamp_max(1e-4) for s in sums]
    torch.testing.assert_close(f_backbone, flatten(expected[: len(params)]))
    torch.testing.assert_close(f_weight, torch.cat(expected[len(params) :: 2]))
    torch.testing.assert_close(f_bias, torch.cat(expected[len(params) + 1 :: 2]))
    assert f_weight[:2].abs().sum() > 0  # the old head has its own Fisher (not a stale gradient)
    assert (f_backbone == 1e-4).any() and (f_backbone < 1e-4).any()  # clipped at fisher_max


@pytest.mark.parametrize("fisher_weighting, scale_new_head", [(True, False), (True, True), (False, False)])
def test_session_1_merges_backbone_and_heads_and_aligns_from_the_merge(monkeypatch, fisher_weighting, scale_new_head):
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    learner = make_learner(
        "cofima",
        tiny_vit(),
        scenario,
        runtime,
        epochs=1,
        batch_size=16,
        ca_epochs=1,
        fisher_weighting=fisher_weighting,
        scale_new_head_by_fisher=scale_new_head,
    )
    fit(learner, pipeline, scenario.sessions[0])
    assert learner.fisher_head_weight.shape == (2, 48) and learner.fisher_backbone.numel() == (
        learner.backbone.num_parameters() if fisher_weighting else 0
    )
    previous = flatten(learner.merged_parameters())
    f0, fw0, fb0 = learner.fisher_backbone.clone(), learner.fisher_head_weight.clone(), learner.fisher_head_bias.clone()
    aligned_w0, aligned_b0 = learner.aligned_weight.clone(), learner.aligned_bias.clone()
    seen: dict = {}
    original_fisher = learner.fisher

    def spying_fisher(session, params, heads):
        seen["trained"] = flatten(params)
        seen["stage1"] = (
            torch.cat([h.weight for h in heads]).detach().clone(),
            torch.cat([h.bias for h in heads]).detach(),
        )
        seen["fisher"] = original_fisher(session, params, heads)
        return seen["fisher"]

    original_align = slca_module.align_classifier

    def spying_align(head, *args, **kwargs):
        seen["init"] = head.weight.detach().clone(), head.bias.detach().clone()
        return original_align(head, *args, **kwargs)

    monkeypatch.setattr(learner, "fisher", spying_fisher)
    monkeypatch.setattr(slca_module, "align_classifier", spying_align)
    fit(learner, pipeline, scenario.sessions[1])

    a, (f1, fw1, fb1), trained = 0.4, seen["fisher"], seen["trained"]
    (w1, b1), (init_w, init_b) = seen["stage1"], seen["init"]

    def merged(x0, x1, g0, g1):
        return ((1 - a) * g0 * x0 + a * g1 * x1) / ((1 - a) * g0 + a * g1) if fisher_weighting else 0.6 * x0 + 0.4 * x1

    torch.testing.assert_close(flatten(learner.merged_parameters()), merged(previous, trained, f0, f1))
    # alignment starts from the merged old head (aligned after session 0 vs stage 1) and the new head
    torch.testing.assert_close(init_w[:2], merged(aligned_w0[:2], w1[:2], fw0, fw1[:2]))
    torch.testing.assert_close(init_b[:2], merged(aligned_b0[:2], b1[:2], fb0, fb1[:2]))
    new_w, new_b = (w1[2:] * fw1[2:], b1[2:] * fb1[2:]) if scale_new_head else (w1[2:], b1[2:])
    torch.testing.assert_close(init_w[2:], new_w)
    torch.testing.assert_close(init_b[2:], new_b)
    if scale_new_head:  # the reference's product: the new head shrinks to <= 1e-4 of its size
        assert init_w[2:].abs().max() <= 1e-4 * w1[2:].abs().max()
    if fisher_weighting:
        assert torch.equal(learner.fisher_backbone, f1) and torch.equal(learner.fisher_head_weight, fw1)
    # the stage-1 heads are back for the next session; predictions use the aligned copy
    torch.testing.assert_close(torch.cat([h.weight for h in learner.heads]), w1)
    assert not torch.allclose(learner.aligned_weight, init_w)
    batch = next(iter(pipeline.batches(TEST, range(4), 16)))
    with torch.no_grad():
        feats = learner.backbone(batch.images)
    torch.testing.assert_close(learner.predict(batch), feats @ learner.aligned_weight.T + learner.aligned_bias)
    state = learner.state_dict()
    assert {"fisher_backbone", "fisher_head_weight", "fisher_head_bias"} <= set(state)


def test_two_sessions_resume_identically(tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides("cofima"), tmp_path)
