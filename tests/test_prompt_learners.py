"""L2P, DualPrompt and CODA-Prompt: selection, pull loss, masking, Gram-Schmidt, slices, runs, checkpoints."""

from __future__ import annotations

import logging
import math
from functools import partial

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import FAST, compose_config, run_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.checkpoint import seed_everything
from pilot.data.pipeline import TEST, Batch, DataPipeline
from pilot.data.scenario import make_scenario
from pilot.errors import ConfigError, IncompatibleBackboneError
from pilot.learners.base import build_learner
from pilot.learners.coda import CodaPrompt
from pilot.learners.dualprompt import DualPrompt
from pilot.learners.l2p import L2P
from pilot.learners.schedules import coda_cosine
from pilot.modules.masking import mask_old_classes
from pilot.modules.prompt_pools import (
    CodaPromptPool,
    PromptPool,
    batchwise_vote,
    coda_weights,
    cosine_similarity,
    gram_schmidt_slice,
    select_top_k,
    surrogate_similarity,
)
from pilot.runtime import Runtime

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)
ADAM = partial(torch.optim.Adam, lr=1e-3)
TINY = ["scenario=b0inc2", "dataset.num_classes=6", "method.epochs=1"]
# CODA on the tiny ViT (width 48): a pool that stays orthogonal in 48 dims, and batches that exist.
METHODS = {"l2p": [], "dualprompt": [], "coda": ["method.pool_size=12", "method.batch_size=8"]}


# ------------------------------------------------------------------------------------- selection
def test_top_k_and_batchwise_vote_on_a_hand_made_similarity():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1], [0.6, 0.0, 0.9, 0.2]])
    assert select_top_k(sim, 2, batchwise=False).tolist() == [[0, 2], [1, 2], [2, 0]]
    # Votes: id 2 three times, id 0 twice, id 1 once -> ids [2, 0] for every sample.
    assert select_top_k(sim, 2, batchwise=True).tolist() == [[2, 0]] * 3
    # Ties go to the smaller id: ids 3 and 1 both voted twice, id 0 once.
    assert batchwise_vote(torch.tensor([[3], [1], [3], [1], [0]]), pool_size=4).tolist() == [[1]] * 5
    assert batchwise_vote(torch.tensor([[3, 0], [1, 3], [1, 2]]), pool_size=4).tolist() == [[1, 3]] * 3


def test_vote_groups_reproduce_the_votes_of_small_batches():
    # Groups of 3 consecutive samples vote separately; the last group is incomplete (2 samples).
    votes = torch.tensor([[2], [2], [0], [1], [3], [3], [0], [1]])
    expected = [[2]] * 3 + [[3]] * 3 + [[0]] * 2  # group 3 ties 0/1 -> 0
    assert batchwise_vote(votes, pool_size=4, group_size=3).tolist() == expected
    separately = [batchwise_vote(part, pool_size=4).tolist() for part in votes.split(3)]
    assert sum(separately, []) == expected


def test_pull_term_on_a_hand_made_case():
    """S = sum_b sum_{j selected} cos(q_b, k_j) / B."""
    query = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    keys = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    sim = cosine_similarity(query, keys)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), -1.0]]))
    indices = torch.tensor([[0, 1], [1, 2]])
    expected = (1 + 1 / math.sqrt(2) + 1 / math.sqrt(2) - 1) / 2
    assert surrogate_similarity(sim, indices).item() == pytest.approx(expected, abs=1e-6)
    # Through a pool, with a forced id (DualPrompt's task-forced E-prompt): S = mean_b cos(q_b, k_0).
    pool = PromptPool(pool_size=3, tokens=2, dim=2, top_k=1)
    with torch.no_grad():
        pool.keys.copy_(keys)
    selection = pool.select(query, batchwise=True, forced=torch.tensor([0]))
    assert selection.indices.tolist() == [[0], [0]]
    assert selection.pull.item() == pytest.approx((1 + 0) / 2, abs=1e-6)
    selection.pull.backward()  # the pull term trains the selected key only, towards the queries
    torch.testing.assert_close(pool.keys.grad[0], torch.tensor([0.0, 0.25]))  # (sum_b q_b/|q_b| - S' k/|k|) / (B |k|)
    assert pool.keys.grad[1:].abs().sum() == 0


def test_masked_logits_cover_the_current_session_only():
    logits = torch.arange(12.0).view(2, 6)
    masked = mask_old_classes(logits, known=2, total=4)
    assert masked.shape == (2, 4)
    assert torch.isinf(masked[:, :2]).all() and (masked[:, :2] < 0).all()
    torch.testing.assert_close(masked[:, 2:], logits[:, 2:4])
    labels = torch.tensor([2, 3])
    torch.testing.assert_close(F.cross_entropy(masked, labels), F.cross_entropy(logits[:, 2:4], labels - 2))
    assert mask_old_classes(logits, known=0, total=3).tolist() == logits[:, :3].tolist()


# ------------------------------------------------------------------------------------------ CODA
def test_gram_schmidt_slice_is_orthonormal_and_orthogonal_to_earlier_rows():
    torch.manual_seed(0)
    matrix = torch.zeros(10, 64)
    matrix[:4] = torch.randn(4, 64) + 1.0  # earlier (trained, not orthogonal) rows
    out = gram_schmidt_slice(matrix, 4, 7)
    torch.testing.assert_close(out[:4], matrix[:4], rtol=0, atol=0)
    new = out[4:7]
    torch.testing.assert_close(new @ new.T, torch.eye(3), rtol=0, atol=1e-5)
    assert (new @ matrix[:4].T).abs().max() < 1e-5
    assert (out[7:] == 0).all()
    # The pool: session 0 slice orthonormal, zeros beyond; session 1 keeps slice 0 unchanged.
    pool = CodaPromptPool(layers=2, pool_size=6, length=2, dim=8, num_sessions=3)
    pool.begin_session(0)
    for t in (pool.keys, pool.attention, pool.prompts):
        torch.testing.assert_close(
            t[:, :2] @ t[:, :2].transpose(1, 2), torch.eye(2).expand(2, -1, -1), rtol=0, atol=1e-5
        )
        assert (t[:, 2:] == 0).all()
    first = pool.prompts[:, :2].clone()
    pool.begin_session(1)
    torch.testing.assert_close(pool.prompts[:, :2], first, rtol=0, atol=0)
    assert (pool.prompts[:, :2] @ pool.prompts[:, 2:4].transpose(1, 2)).abs().max() < 1e-5


def test_coda_weights_are_the_reference_formula():
    torch.manual_seed(0)
    q, A, K = torch.randn(5, 16), torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    for layer in range(3):  # official CodaPrompt.forward, one layer at a time
        a_q = F.normalize(torch.einsum("bd,kd->bkd", q, A[layer]), dim=2)
        expected = torch.einsum("bkd,kd->bk", a_q, F.normalize(K[layer], dim=1))
        torch.testing.assert_close(coda_weights(q, A, K)[layer], expected, rtol=1e-5, atol=1e-6)


def test_only_the_current_coda_slice_receives_gradients():
    torch.manual_seed(0)
    pool = CodaPromptPool(layers=2, pool_size=6, length=2, dim=8, num_sessions=3)
    pool.begin_session(0)
    pool.begin_session(1)
    prompts, penalty = pool(torch.randn(4, 8), train=True, ortho_mu=0.5)
    assert prompts.shape == (2, 4, 2, 8) and penalty.item() > 0
    (prompts.square().sum() + penalty).backward()
    for t in (pool.keys, pool.attention, pool.prompts):
        assert (t.grad[:, :2] == 0).all() and (t.grad[:, 4:] == 0).all()  # earlier detached, future unused
        assert (t.grad[:, 2:4] != 0).any()
    # Evaluation uses every component learned so far: the mixture over rows [0, 4).
    q = torch.randn(3, 8)
    mixed, _ = pool(q, train=False)
    alpha = coda_weights(q, pool.attention[:, :4], pool.keys[:, :4])
    torch.testing.assert_close(mixed.flatten(2), torch.bmm(alpha, pool.prompts[:, :4]))


def test_coda_cosine_schedule_unshifted_option():
    """The formula without CODA's one-epoch shift (the default, shifted one: tests/test_coda_schedule.py)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=0.001)
    scheduler = coda_cosine(optimizer, epochs=5, shifted=False)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.001 * math.cos(99 * math.pi * e / 800) for e in range(5)])
    assert lrs[-1] == pytest.approx(0.001 * 0.01570, rel=1e-3)
    single = coda_cosine(torch.optim.Adam([param], lr=0.001), epochs=1)
    assert single.get_last_lr() == [0.001]


# ------------------------------------------------------------------------------ learner mechanics
def _tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=6,
        num_heads=3,
    )
    return Backbone(vit, "tiny", 32, None, None, pretrained=False)


def test_dualprompt_copies_the_previous_e_prompt_and_forces_the_task_prompt(caplog):
    scenario = make_scenario(6, 2, 2)
    learner = make_learner("dualprompt", _tiny_backbone(), scenario, CPU, optimizer=ADAM)
    learner.begin_session(scenario.sessions[0])
    with torch.no_grad():
        learner.e_pool.prompts[0] = 7.0
    keys = learner.e_pool.keys.detach().clone()
    learner.begin_session(scenario.sessions[1])
    assert (learner.e_pool.prompts[1] == 7.0).all() and not (learner.e_pool.prompts[2] == 7.0).all()
    torch.testing.assert_close(learner.e_pool.keys, keys, rtol=0, atol=0)  # keys are not copied
    # Session 1 trains E-prompt 1 for every sample, whatever the keys say.
    used = []
    select = learner.e_pool.select
    learner.e_pool.select = lambda *a, **k: used.append(select(*a, **k)) or used[-1]  # type: ignore[method-assign]
    batch = Batch(torch.rand(4, 3, 32, 32), lambda x: x, torch.tensor([2, 3, 2, 3]), torch.arange(4), "train", True, 4)
    learner.loss(batch)
    assert used[0].indices.tolist() == [[1]] * 4
    # A pool smaller than the number of sessions: refused, unless the reference's fallback is asked for,
    # which then warns and says what happens.
    with pytest.raises(ConfigError, match="allow_short_pool=true"):
        make_learner("dualprompt", _tiny_backbone(), make_scenario(12, 1, 1), CPU, optimizer=ADAM)
    with caplog.at_level(logging.WARNING):
        small = make_learner(
            "dualprompt", _tiny_backbone(), make_scenario(12, 1, 1), CPU, optimizer=ADAM, allow_short_pool=True
        )
    assert "task slots for 10 sessions, but the scenario has 12" in caplog.text and "key matching" in caplog.text
    assert small.task_slots(9) == slice(9, 10) and small.task_slots(10) is None  # session 10: no forced prompt


def test_per_sample_selection_does_not_depend_on_the_batch():
    scenario = make_scenario(6, 2, 2)
    learner = make_learner("l2p", _tiny_backbone(), scenario, CPU, optimizer=ADAM, batchwise_prompt_eval=False).eval()
    learner.begin_session(scenario.sessions[0])
    images = torch.rand(6, 3, 32, 32)

    def batch(ids):
        return Batch(images[ids], lambda x: x, torch.zeros(len(ids), dtype=torch.long), ids, "test", False, 6)

    query, calls = learner.vit.query, []
    learner.vit.query = lambda images: calls.append(len(images)) or query(images)  # type: ignore[method-assign]
    full = learner.predict(batch(torch.arange(6)))
    assert full.shape == (6, 2)
    torch.testing.assert_close(learner.predict(batch(torch.arange(2))), full[:2], rtol=1e-5, atol=1e-5)
    assert calls == [6]  # test queries are computed once per image and cached by sample id


# --------------------------------------------------------------------------------- whole learners
@pytest.mark.parametrize("method", list(METHODS))
def test_three_sessions_end_to_end(method, tmp_path, fast):
    run_dir = tmp_path / "run"
    run_config(fast + [f"+method={method}", *TINY, *METHODS[method]], run_dir)
    sessions = pd.read_csv(run_dir / "sessions.csv")
    assert sessions["session"].tolist() == [0, 1, 2]
    assert sessions["n_seen"].tolist() == [2, 4, 6]
    assert sessions["acc"].between(0, 100).all()
    head = 48 * 6 + 6  # one head over the 6 classes of the dataset
    trainable = {
        "l2p": 10 * 5 * 48 + 10 * 48,
        "dualprompt": 2 * 2 * 5 * 48 + 10 * 3 * 2 * 5 * 48 + 10 * 48,
        "coda": 5 * 12 * (8 * 48 + 2 * 48),
    }[method] + head
    assert sessions["params_trainable"].tolist() == [trainable] * 3
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]
    if method == "coda":
        assert config["scheduler"]["epochs"] == 1 and config["drop_last"] is True
        # Synthetic data: LAMDA-PILOT gives CODA its own transforms on CIFAR-100 and ImageNet-R only.
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["transforms"]["train_scale"] == [0.05, 1.0]
    else:
        assert config["vote_batch_size"] == config["batch_size"] == {"l2p": 16, "dualprompt": 24}[method]
        assert config["eval_batch_size"] == {"l2p": 512, "dualprompt": 504}[method]


def test_reference_defaults_per_dataset(tmp_path):
    def resolved(*overrides):
        return OmegaConf.to_container(compose_config(["logger=csv", *overrides], tmp_path), resolve=True)

    l2p_c, l2p_r = resolved("+method=l2p")["method"], resolved("+method=l2p", "dataset=imagenet_r")["method"]
    assert (l2p_c["epochs"], l2p_c["batch_size"], l2p_c["vote_batch_size"]) == (5, 16, 16)
    assert (l2p_r["epochs"], l2p_r["batch_size"], l2p_r["vote_batch_size"]) == (10, 32, 32)
    assert (l2p_r["optimizer"]["lr"], l2p_r["pull_coeff"], l2p_r["top_k"], l2p_r["batchwise_prompt"]) == (
        0.001875,
        0.1,
        5,
        True,
    )
    dual = resolved("+method=dualprompt", "dataset=imagenet_r")["method"]
    assert (dual["epochs"], dual["batch_size"], dual["vote_batch_size"], dual["optimizer"]["lr"]) == (10, 24, 24, 0.001)
    coda_c, coda_r = resolved("+method=coda"), resolved("+method=coda", "dataset=imagenet_r")
    assert (coda_c["method"]["epochs"], coda_r["method"]["epochs"], coda_r["method"]["scheduler"]["epochs"]) == (
        20,
        50,
        50,
    )
    assert coda_c["transforms"]["test_crop_pct"] == 1.0 and coda_r["transforms"]["test_crop_pct"] == 0.875
    assert (coda_c["seed"], coda_c["scenario"]["class_order"]) == (1993, "shuffle")  # the common order
    quirk = resolved("+method=coda", "experiment=coda_reference_order")
    assert (quirk["seed"], quirk["scenario"]["class_order"]) == (0, "natural")


def test_trainable_parameters_of_vit_b16_match_the_reference():
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    backbone = Backbone(vit, "vit_base_patch16_224", 224, None, None, pretrained=False)
    scenario = make_scenario(100, 10, 10)
    head = 768 * 100 + 100
    expected = {L2P: 38_400 + 7_680 + head, DualPrompt: 15_360 + 230_400 + 7_680 + head, CodaPrompt: 3_840_000 + head}
    for cls, count in expected.items():
        learner = cls.create(
            backbone, scenario, CPU, optimizer=ADAM, **({"scheduler": None} if cls is CodaPrompt else {})
        )
        learner.begin_session(scenario.sessions[0])
        assert sum(p.numel() for p in learner.parameters() if p.requires_grad) == count, cls.__name__
        assert not any(k.startswith("backbone.") for k in learner.state_dict())


def test_a_cnn_backbone_is_refused():
    cnn = Backbone(timm.create_model("resnet18", pretrained=False, num_classes=0), "resnet18", 224, None, None, False)
    for cls in (L2P, DualPrompt, CodaPrompt):
        with pytest.raises(IncompatibleBackboneError, match="VisionTransformer"):
            cls.create(cnn, make_scenario(10, 2, 2), CPU, optimizer=ADAM, scheduler=None)


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_after_two_sessions_restores_identical_predictions(method, tmp_path):
    cfg = compose_config(FAST + [f"+method={method}", *TINY, *METHODS[method]], tmp_path)
    runtime = instantiate(cfg.runtime)
    seed_everything(int(cfg.seed))
    data = instantiate(cfg.dataset)
    scenario = instantiate(cfg.scenario, num_classes=data.num_classes)
    backbone = instantiate(cfg.backbone)
    pipeline = DataPipeline(data, scenario, instantiate(cfg.transforms), runtime)

    def build():
        return build_learner(cfg.method, backbone, scenario, runtime)

    learner = build()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    for info in scenario.sessions[:2]:
        learner.train()
        learner.fit(pipeline.session(info))
    state = learner.state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert any(not torch.equal(state[k], before[k]) for k in state)  # training changed the prompts/head

    fresh = build()
    fresh.restore(state, sessions_done=2)
    learner.eval(), fresh.eval()
    assert (fresh.known, fresh.total) == (learner.known, learner.total) == (2, 4)
    for batch in pipeline.batches(TEST, range(0, 4), learner.eval_batch_size):
        torch.testing.assert_close(fresh.predict(batch), learner.predict(batch), rtol=0, atol=0)
    if hasattr(learner, "vote_batch_size"):
        # One large evaluation batch votes in groups exactly as the reference's small test batches do.
        small = torch.cat([learner.predict(b) for b in pipeline.batches(TEST, range(0, 4), learner.vote_batch_size)])
        large = torch.cat(
            [learner.predict(b) for b in pipeline.batches(TEST, range(0, 4), 4 * learner.vote_batch_size)]
        )
        torch.testing.assert_close(large, small, rtol=1e-5, atol=1e-5)
