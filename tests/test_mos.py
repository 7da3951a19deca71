"""MOS: the orthogonality term, adapter merging, self-refined retrieval and the drift of the reference,
each against a computation in the test; checkpoints; end to end with resume."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config
from test_ease_slca import all_logits, fit, tiny_setup, tiny_vit
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides
from torch.optim import SGD
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import TEST, Batch
from pilot.errors import ConfigError
from pilot.learners import mos as mos_module
from pilot.learners.mos import MOS, adapter_features, orthogonality_loss
from pilot.loop import build_data, build_model
from pilot.modules.adapter_merging import SelectedFeatures, flat_parameters, merge_toward, self_refined_logits
from pilot.modules.alignment import mean_scale


@dataclass
class OneBatchSession:
    """What ``MOS.train_session`` reads of a session: its info and a fixed training stream."""

    info: Any
    batch: Batch

    def train_batches(self, batch_size: int) -> list[Batch]:
        return [self.batch]


def fixed_batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    return Batch(images, lambda x: x, labels, torch.arange(len(labels)), TEST, True, len(labels))


def merged(flat: torch.Tensor, target: torch.Tensor, times: list[int], m: float = 0.1) -> torch.Tensor:
    """Closed form of ``times[i]`` momentum merges of block i: (1-m)^k x + (1 - (1-m)^k) target."""
    keep = torch.tensor([(1 - m) ** k for k in times], dtype=flat.dtype).repeat_interleave(flat.numel() // len(times))
    return keep * flat + (1 - keep) * target


DEPTH = 6  # blocks of the tiny ViT
BEFORE = [i + 1 for i in range(DEPTH)]  # the reference merges all blocks' adapters before each block runs


def randomise(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------- mechanisms
def test_orthogonality_loss_is_the_cross_entropy_of_scaled_similarities():
    gen = torch.Generator().manual_seed(0)
    feats, anchors = torch.randn(5, 8, generator=gen), torch.randn(3, 8, generator=gen)
    rows = torch.cat([anchors, feats]).double()
    expected = 0.0
    for i in range(len(rows)):  # row i's positive is itself, over all rows (anchors included)
        sims = torch.stack([rows[i] @ rows[j] / 0.8 for j in range(len(rows))])
        expected += float(torch.logsumexp(sims, 0) - sims[i]) / len(rows)
    assert float(orthogonality_loss(feats, anchors, 0.8)) == pytest.approx(expected, rel=1e-5)
    # session 0: no stored means, the batch alone; orthonormal rows: -log(e^1.25 / (e^1.25 + n - 1))
    assert float(orthogonality_loss(torch.eye(4), torch.zeros(0, 4))) == pytest.approx(
        -math.log(math.exp(1.25) / (math.exp(1.25) + 3)), rel=1e-6
    )


def test_self_refined_logits_equal_a_per_sample_loop_on_fixed_logits():
    gen = torch.Generator().manual_seed(1)
    samples, tasks, classes = 300, 4, 8
    class_task = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    table = torch.randn(samples, tasks, classes, generator=gen)  # head logits of sample b under adapter t
    first = torch.randint(0, tasks, (samples,), generator=gen)
    calls = []

    def logits_under(rows: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return table[rows, task_ids]

    out = self_refined_logits(first, logits_under, class_task, rounds=4)
    rounds_used = []
    for b in range(samples):  # the reference's loop, sample by sample
        loop, prev = 0, int(first[b])
        while True:
            loop += 1
            logits = table[b, prev]
            cur = int(class_task[logits.argmax()])
            if loop >= 4 or cur == prev:
                break
            prev = cur
        torch.testing.assert_close(out[b], logits, rtol=0, atol=0)
        rounds_used.append(loop)
    assert set(rounds_used) == {1, 2, 3, 4}  # stopped at once, later, and at the cap
    assert calls == [sum(r > k for r in rounds_used) for k in range(4)]  # finished samples are not scored again


def test_selected_features_computes_each_pair_once():
    computed = []

    def compute(j: int, rows: torch.Tensor) -> torch.Tensor:
        computed.extend((j, int(r)) for r in rows)
        return torch.stack([torch.tensor([10.0 * j + r, -1.0]) for r in rows.tolist()])

    features = SelectedFeatures(compute, 5)
    features.put(0, torch.zeros(5, 2))
    rows, ids = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 0, 2, 1])
    torch.testing.assert_close(features(rows, ids), torch.tensor([[20.0, -1], [0, 0], [22, -1], [13, -1]]))
    torch.testing.assert_close(
        features(torch.tensor([2, 4]), torch.tensor([2, 2])), torch.tensor([[22.0, -1], [24, -1]])
    )
    assert sorted(computed) == [(1, 3), (2, 0), (2, 2), (2, 4)]


@pytest.mark.parametrize("drift", [False, True])
def test_one_training_step_then_the_merge_toward_the_mean_of_earlier_snapshots(drift, monkeypatch):
    """Session 2, one SGD step (lr 0.5, head 0.05): A' = 0.9 (A_step - 0.5 g) + 0.1 (S_0 + S_1) / 2. Without
    drift A_step = A. With drift block l's adapter runs after l + 1 merges of A (g is taken there) and
    A_step = A after D merges (the reference merges every block's adapter before each block). S_2 = A'."""
    runtime, scenario, pipeline = tiny_setup(num_classes=6)
    sgd = partial(SGD, lr=0.5)
    learner = make_learner("mos", tiny_vit(), scenario, runtime, optimizer=sgd, scheduler=None, epochs=1,
                           batch_size=4, adapter_dropout=0.0, adapter_drift=drift)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for t in range(2):
        learner.begin_session(scenario.sessions[t])
        randomise(learner.adapters[t], gen)
        learner.history.record(t, learner.adapters[t])
    info = scenario.sessions[2]
    learner.begin_session(info)
    randomise(learner.current, gen)
    learner.stats.means.copy_(torch.randn(learner.stats.means.shape, generator=gen))
    start, head = flat_parameters(learner.current), flat_parameters(learner.head)
    w, b = learner.head.weight.detach().clone(), learner.head.bias.detach().clone()
    mean = (flat_parameters(learner.adapters[0]) + flat_parameters(learner.adapters[1])) / 2
    seen = merged(start, mean, BEFORE) if drift else start  # what the blocks use in the forward
    at_step = merged(start, mean, [DEPTH] * DEPTH) if drift else start
    batch = fixed_batch(torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([4, 5, 5, 4]))
    grads, losses = [], []
    handle = register_optimizer_step_pre_hook(lambda opt, *_: grads.append(flat_parameters_grad(opt)))
    spy = mos_module.train_epochs
    monkeypatch.setattr(mos_module, "train_epochs", lambda *a, **k: losses.append(spy(*a, **k)))
    try:
        learner.train()
        learner.train_session(OneBatchSession(info, batch))
    finally:
        handle.remove()
    g_adapter, g_head = grads[0]
    expected = 0.9 * (at_step - 0.5 * g_adapter) + 0.1 * mean
    torch.testing.assert_close(flat_parameters(learner.current), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_parameters(learner.head), head - 0.05 * g_head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_parameters(learner.adapters[2]), expected, rtol=1e-5, atol=1e-7)
    sums = flat_parameters(learner.adapters[0]) + flat_parameters(learner.adapters[1]) + expected
    torch.testing.assert_close(learner.history.sums[2], sums, rtol=1e-5, atol=1e-6)
    # the loss: CE with old classes masked + 0.1 x the orthogonality term on the stored means, at A_fwd
    check = copy.deepcopy(learner.current)
    merge_toward(check, seen, 1.0)  # the adapter values the forward saw
    feats = adapter_features(learner.backbone, batch.images, check)
    z = feats @ w.T + b
    z[:, :4] = float("-inf")
    with torch.no_grad():
        expected_loss = F.cross_entropy(z, batch.labels) + 0.1 * orthogonality_loss(feats, learner.stats.means[:4])
    assert losses[0][0] == pytest.approx(expected_loss.item(), rel=1e-5)


def flat_parameters_grad(opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the two parameter groups (adapter, head), flattened."""
    return tuple(torch.cat([p.grad.reshape(-1) for p in g["params"]]) for g in opt.param_groups)  # type: ignore[return-value]


# ------------------------------------------------------------------------- inference, drift
@pytest.fixture(scope="module")
def mos_three_sessions():
    """MOS (drift on, batch 8) on the tiny ViT after three sessions of two classes (one epoch each)."""
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup()
    torch.manual_seed(0)
    learner = make_learner("mos", tiny_vit(), scenario, runtime, epochs=1, ca_epochs=1, batch_size=8)
    for info in scenario.sessions:
        fit(learner, pipeline, info)
    return learner, scenario, pipeline


def reference_scores(learner: MOS, images: torch.Tensor, adapters: list) -> torch.Tensor:
    """The reference's evaluation of one test batch: every sample under every adapter, a per-sample
    refinement loop, softmax(head) + softmax((T + 1) x prototype cosine)."""
    feats = [adapter_features(learner.backbone, images, a) for a in adapters]
    proto = F.normalize(feats[0], dim=1) @ F.normalize(learner.prototypes.weight, dim=1).T
    task = learner.class_task
    out = []
    for b in range(len(images)):
        loop, prev = 0, int(task[proto[b].argmax()])
        while True:
            loop += 1
            logits = learner.head(feats[prev][b : b + 1])[:, : learner.total]
            cur = int(task[logits.argmax()])
            if loop >= 4 or cur == prev:
                break
            prev = cur
        out.append(logits.softmax(1) + (proto[b : b + 1] * len(adapters)).softmax(1))
    return torch.cat(out)


def test_predict_is_the_reference_evaluation_and_drifts_once_per_block(mos_three_sessions):
    learner, scenario, pipeline = copy.deepcopy(mos_three_sessions)
    learner.eval()
    assert learner.eval_protocol == "adapter-drift(b=8)" and learner.eval_batch_size == 128
    batch = next(iter(pipeline.eval_batches(TEST, range(6), 16)))  # two reference test batches of 8
    before = [copy.deepcopy(a) for a in learner.adapters]
    targets = [None] + [learner.history.target(t) for t in (1, 2)]
    expected = []
    for block in range(2):
        used = [before[0]] + [copy.deepcopy(before[t]) for t in (1, 2)]
        for t in (1, 2):  # every adapter with id >= 1 in the forward of each reference test batch
            merge_toward(used[t], merged(flat_parameters(before[t]), targets[t], BEFORE), 1.0)
            merge_toward(before[t], merged(flat_parameters(before[t]), targets[t], [DEPTH] * DEPTH), 1.0)
        expected.append(reference_scores(learner, batch.images[8 * block : 8 * block + 8], used))
    torch.testing.assert_close(learner.predict(batch), torch.cat(expected), rtol=1e-4, atol=1e-5)
    for t in (1, 2):  # S_t after two test batches: 2 D merges
        torch.testing.assert_close(flat_parameters(learner.adapters[t]), flat_parameters(before[t]))
    assert torch.equal(flat_parameters(learner.adapters[0]), flat_parameters(mos_three_sessions[0].adapters[0]))

    learner.adapter_drift = False  # the paper: the stored adapters do not move, scores are per-sample
    still = flat_parameters(learner.adapters[2])
    first, again = learner.predict(batch), learner.predict(batch)
    assert torch.equal(first, again) and torch.equal(still, flat_parameters(learner.adapters[2]))
    torch.testing.assert_close(
        first, reference_scores(learner, batch.images, list(learner.adapters)), rtol=1e-4, atol=1e-5
    )
    learner.ensemble = False
    assert torch.equal(learner.predict(batch).argmax(1), learner.predict(batch).argmax(1))


def test_statistics_pass_merges_per_class_batch_and_stores_gaussians(mos_three_sessions):
    learner, scenario, pipeline = copy.deepcopy(mos_three_sessions)
    session = pipeline.session(scenario.sessions[2])
    target, start = learner.history.target(2), flat_parameters(learner.current)
    learner.batch_size = 4  # 16 images per class in batches of 12: 2 batches x 2 classes = 4 forwards of D merges
    feats, labels = learner.statistics_features(session)
    torch.testing.assert_close(flat_parameters(learner.current), merged(start, target, [4 * DEPTH] * DEPTH))
    assert feats.shape == (32, 48) and labels.tolist() == [4] * 16 + [5] * 16
    learner.adapter_drift = False
    feats, labels = learner.statistics_features(session)
    direct = adapter_features(
        learner.backbone, torch.cat([b.images for b in session.prototype_batches(32)]), learner.current
    )
    torch.testing.assert_close(feats, direct, rtol=1e-4, atol=1e-5)
    learner.stats.update(feats, labels, range(4, 6))
    x = direct[:16].double()
    torch.testing.assert_close(learner.stats.means[4], x.mean(0))
    torch.testing.assert_close(learner.stats.covs[4], torch.cov(x.T) + 1e-4 * torch.eye(48, dtype=torch.float64))
    assert float(mean_scale(torch.full((6,), 2), 2).float()[0]) == 1.0  # alignment: no mean scaling in MOS


def test_checkpoint_holds_every_snapshot_and_restores_the_scores(mos_three_sessions):
    learner, scenario, pipeline = mos_three_sessions
    state = learner.state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert {k.split(".")[1] for k in state if k.startswith("adapters.")} == {"0", "1", "2"}
    assert state["history.sums"].shape == (3, flat_parameters(learner.current).numel())
    assert state["head.weight"].shape == (6, 48) and state["stats.covs"].shape == (6, 48, 48)
    a, b = (
        copy.deepcopy(learner),
        make_learner("mos", tiny_vit(), scenario, learner.runtime, epochs=1, ca_epochs=1, batch_size=8),
    )
    b.restore(copy.deepcopy(state), 3)
    b.eval()
    assert not any(p.requires_grad for p in b.adapters.parameters())
    torch.testing.assert_close(all_logits(b, pipeline, 6), all_logits(a, pipeline, 6), rtol=0, atol=0)


def test_configuration_checks_and_vit_b16_parameter_counts(tmp_path):
    cfg = compose_config(FAST + ["+method=mos", "method.ca_storage=variance"], tmp_path)
    with pytest.raises(ConfigError, match="method.ca_storage=variance"):
        build_model(cfg, build_data(cfg))
    cfg = compose_config(FAST + ["+method=mos", "method.eval_batch_size=100", "method.adapter_drift=false"], tmp_path)
    assert build_model(cfg, build_data(cfg)).learner.eval_batch_size == 100  # no drift: no alignment needed

    runtime, scenario, _ = tiny_setup(num_classes=100, init_cls=5, increment=5)
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    learner = make_learner("mos", Backbone(vit, "vit_b16", 224, None, None, pretrained=False), scenario, runtime)
    assert learner.eval_batch_size == 96  # 128 rounded down to whole reference test batches of 48
    per_set = 12 * (768 * 16 + 16 + 16 * 768 + 768)  # AdaptFormer r = 16 on ViT-B/16
    for info in scenario.sessions[:2]:
        learner.begin_session(info)
        trainable = sum(p.numel() for p in learner.parameters() if p.requires_grad)
        assert trainable == per_set + 100 * 768 + 100 == 381_220  # the adapter + a head over all 100 classes
    assert sum(p.numel() for p in learner.adapters.parameters()) == 2 * per_set


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("drift", ["true", "false"])
def test_two_sessions_resume_identically(drift, tmp_path):
    assert_resumes_identically(
        FAST + TWO_SESSIONS + small_overrides("mos") + [f"method.adapter_drift={drift}"], tmp_path
    )
