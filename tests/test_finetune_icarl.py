"""Finetune and iCaRL (pilot/learners/finetune.py, icarl.py, replay.py), NME evaluation and its columns.

Losses against closed forms (KD, the paper's BCE, Finetune's CE over the new classes), the previous
network iCaRL distils from, the growing head; both learners end to end on the tiny ViT with resume,
``memory.csv``, ``acc_nme`` in ``sessions.csv``/``matrix.csv``, and the NME and memory columns of
``pilot.tables``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config, run_config, small_overrides
from test_registry import TWO_SESSIONS, assert_resumes_identically

from pilot import tables
from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.config import build
from pilot.data.pipeline import TEST, Batch
from pilot.data.scenario import Scenario, make_scenario
from pilot.eval.evaluator import Evaluator
from pilot.learners.icarl import ICaRL, icarl_bce_loss
from pilot.learners.replay import grown_linear, kd_loss
from pilot.loop import RunInterrupted, build_data, build_model
from pilot.runtime import Runtime

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)
# 12, then 6 exemplars per class; noisier images so that NME is not 100% (53.1% after session 1)
ICARL = [*TWO_SESSIONS, *small_overrides("icarl"), "method.memory_size=24", "dataset.noise=150"]
FINETUNE = [*TWO_SESSIONS, *small_overrides("finetune")]


def tiny_learner(method: str, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = compose_config(FAST)
    backbone: Backbone = build(cfg.backbone)
    return make_learner(method, backbone, make_scenario(4, 2, 2, class_order="natural"), CPU, **settings)


def batch(labels: list[int], seed: int = 0) -> Batch:
    images = torch.rand(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(len(labels))
    return Batch(images, lambda x: x, torch.tensor(labels), ids, "train", True, len(labels))


def captured_loss(learner, session_index: int):
    """The loss function ``train_session`` hands to the training loop, for session ``session_index``."""
    info = learner.scenario.sessions[session_index]
    learner.begin_session(info)
    found = {}
    learner.train_epochs = lambda session, loss_fn, *a, **k: found.setdefault("loss", loss_fn)
    learner.train_session(type("S", (), {"info": info})())
    return found["loss"]


# ------------------------------------------------------------------------------------------ losses
def test_kd_loss_is_the_closed_form_without_t_squared():
    gen = torch.Generator().manual_seed(1)
    z, z_old, T = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen), 2.0
    q = np.exp(z_old.numpy() / T) / np.exp(z_old.numpy() / T).sum(1, keepdims=True)
    log_p = z.numpy() / T - np.log(np.exp(z.numpy() / T).sum(1, keepdims=True))
    assert kd_loss(z, z_old, T).item() == pytest.approx(-(q * log_p).sum() / 5, rel=1e-6)
    entropy = -(F.softmax(z_old, 1) * F.log_softmax(z_old, 1)).sum(1).mean()  # identical logits: the entropy
    assert kd_loss(z_old, z_old, 1.0).item() == pytest.approx(entropy.item(), rel=1e-6)


def test_the_papers_bce_uses_distilled_targets_for_old_classes():
    z = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    z_old = torch.tensor([[2.0], [-1.0]])
    labels = torch.tensor([2, 1])
    targets = np.array([[1 / (1 + math.exp(-2.0)), 0, 1], [1 / (1 + math.exp(1.0)), 1, 0]])
    p = 1 / (1 + np.exp(-z.numpy()))
    direct = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean()
    assert icarl_bce_loss(z, z_old, labels).item() == pytest.approx(direct, rel=1e-6)
    onehot = np.eye(3)[[2, 1]]
    assert icarl_bce_loss(z, None, labels).item() == pytest.approx(
        -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p)).mean(), rel=1e-6
    )


def test_grown_linear_keeps_old_rows_and_initialises_new_ones_as_pilots_simple_linear():
    torch.manual_seed(0)
    first = grown_linear(None, 64, 3, "cpu")
    second = grown_linear(first, 64, 5, "cpu")
    assert second.weight.shape == (5, 64) and torch.equal(second.weight[:3], first.weight)
    assert torch.equal(second.bias, torch.zeros(5))
    bound = math.sqrt(3 / 64)  # kaiming_uniform_(nonlinearity="linear")
    assert second.weight[3:].abs().max() <= bound and second.weight[3:].abs().max() > 0.8 * bound


def test_icarl_loss_is_ce_plus_kd_from_the_network_of_the_last_session():
    learner = tiny_learner("icarl")
    learner.begin_session(learner.scenario.sessions[0])
    x = batch([0, 1, 2, 3, 2])
    with torch.no_grad():
        before = learner.head(learner.backbone(x.images))  # the end-of-session-0 network
    loss_fn = captured_loss(learner, 1)
    logits = learner.head(learner.backbone(x.images))
    expected = F.cross_entropy(logits, x.labels) + kd_loss(logits[:, :2], before, 2.0)
    torch.testing.assert_close(loss_fn(x), expected)
    with torch.no_grad():  # the previous network is a copy: training the current one leaves it
        for p in learner.parameters():
            p.add_(0.5)
    shifted = learner.head(learner.backbone(x.images))
    torch.testing.assert_close(
        loss_fn(x), F.cross_entropy(shifted, x.labels) + kd_loss(shifted[:, :2], before, 2.0), rtol=1e-5, atol=1e-5
    )
    assert not any(k.startswith(("previous", "old")) for k in learner.state_dict())
    loss_fn(x).backward()  # gradients reach the backbone (fine-tuned) and every head row
    assert learner.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert (learner.head.weight.grad.abs().sum(1) > 0).all()


def test_icarl_paper_loss_switch():
    learner = tiny_learner("icarl", loss="bce")
    learner.begin_session(learner.scenario.sessions[0])
    x = batch([0, 3, 2])
    with torch.no_grad():
        before = learner.head(learner.backbone(x.images))
    loss_fn = captured_loss(learner, 1)
    logits = learner.head(learner.backbone(x.images))
    torch.testing.assert_close(loss_fn(x), icarl_bce_loss(logits, before, x.labels))


def test_finetune_trains_on_the_new_classes_logits_only():
    learner = tiny_learner("finetune")
    learner.begin_session(learner.scenario.sessions[0])
    loss_fn = captured_loss(learner, 1)
    x = batch([2, 3, 3])
    logits = learner.head(learner.backbone(x.images))
    torch.testing.assert_close(loss_fn(x), F.cross_entropy(logits[:, 2:], x.labels - 2))
    loss_fn(x).backward()
    assert torch.equal(learner.head.weight.grad[:2], torch.zeros(2, learner.head.in_features))
    assert learner.head.weight.grad[2:].abs().sum() > 0
    assert not hasattr(learner, "memory") and not hasattr(learner, "predict_nme")


def test_session_zero_uses_the_init_settings():
    learner = tiny_learner("icarl", init_epochs=3, epochs=5)
    learner.begin_session(learner.scenario.sessions[0])
    assert learner.session_training()[2] == 3 and learner.session_training()[0].keywords["weight_decay"] == 5e-4
    learner.begin_session(learner.scenario.sessions[1])
    assert learner.session_training()[2] == 5 and learner.session_training()[0].keywords["weight_decay"] == 2e-4


# ------------------------------------------------------------------------------------- evaluation
def test_evaluator_scores_nme_logits_in_their_own_matrix():
    ev = Evaluator(Scenario(class_order=(0, 1, 2), sizes=(2, 1)))
    ev.start_session(0)
    ev.update(torch.tensor([[2.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert ev.end_session()["acc_nme"] == 50.0
    ev.start_session(1)
    logits = torch.eye(3)[[0, 1, 2, 2]]
    nme = torch.eye(3)[[0, 0, 2, 1]]
    record = ev.update(logits, torch.tensor([0, 1, 2, 2]), nme) or ev.end_session()
    assert record["acc"] == 100.0 and record["acc_nme"] == 50.0 and record["acc_nme_avg"] == 50.0
    assert [r["acc_nme"] for r in ev.matrix_rows(1)] == [50.0, 50.0]
    other = Evaluator(Scenario(class_order=(0, 1, 2), sizes=(2, 1)))
    other.load_state_dict(ev.state_dict())
    assert other.record(1) == record
    plain = Evaluator(Scenario(class_order=(0, 1), sizes=(1, 1)))
    plain.start_session(0)
    plain.update(torch.tensor([[1.0]]), torch.tensor([0]))
    assert math.isnan(plain.end_session()["acc_nme"])


# -------------------------------------------------------------------------------------- end to end
def train_labels(overrides: list[str]) -> np.ndarray:
    cfg = compose_config(FAST + overrides)
    data = build(cfg.dataset)
    return build(cfg.scenario, num_classes=data.num_classes).remap(data.train.labels)


def test_icarl_runs_resumes_and_writes_its_memory_and_nme_accuracy(tmp_path):
    assert_resumes_identically(FAST + ICARL, tmp_path)
    full = pd.read_csv(tmp_path / "full" / "sessions.csv")
    resumed = pd.read_csv(tmp_path / "cut" / "sessions.csv")
    pd.testing.assert_series_equal(resumed["acc_nme"], full["acc_nme"])
    assert full["acc_nme"].between(0, 100).all()
    np.testing.assert_allclose(full["acc_nme_avg"], full["acc_nme"].expanding().mean(), atol=1e-3)
    matrix = pd.read_csv(tmp_path / "full" / "matrix.csv")
    last = matrix[matrix["session"] == 1]
    assert (last["acc_nme"] * last["n_test"]).sum() / last["n_test"].sum() == pytest.approx(full["acc_nme"].iloc[1])

    with pytest.raises(RunInterrupted):  # the memory after session 0: 24 // 2 = 12 per class
        run_config(FAST + ICARL + ["debug.stop_after_session=0"], tmp_path / "first")
    first = pd.read_csv(tmp_path / "first" / "memory.csv")
    final = pd.read_csv(tmp_path / "full" / "memory.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "memory.csv"), final)
    assert list(final.columns) == ["class", "sample_id", "rank"]
    assert first.groupby("class").size().to_dict() == {0: 12, 1: 12}
    assert final.groupby("class").size().to_dict() == {0: 6, 1: 6, 2: 6, 3: 6}
    assert final["rank"].tolist() == list(range(6)) * 4 and final["sample_id"].is_unique
    for c in (0, 1):  # reduction keeps the first 6 of each class's herding order
        assert final[final["class"] == c]["sample_id"].tolist() == first[first["class"] == c]["sample_id"][:6].tolist()
    labels = train_labels(ICARL)
    assert (labels[final["sample_id"]] == final["class"]).all()

    # acc_nme is the nearest exemplar mean's top-1, recomputed from the checkpoint's class means.
    cfg = compose_config(FAST + ICARL)
    model = build_model(cfg, build_data(cfg))
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["learner"]
    model.learner.restore(state, sessions_done=2)
    model.learner.eval()
    means = state["memory.class_means"].double().numpy()
    hits, count = 0, 0
    with torch.no_grad():
        for test in model.pipeline.batches(TEST, range(4), 16):
            phi = model.learner.exemplar_features(test.images).double().numpy()
            phi /= np.linalg.norm(phi, axis=1, keepdims=True) + 1e-8
            nearest = ((phi[:, None] - means[None]) ** 2).sum(2).argmin(1)
            hits, count = hits + int((nearest == test.labels.numpy()).sum()), count + len(test)
    assert full["acc_nme"].iloc[1] == pytest.approx(100 * hits / count, abs=1e-3)


def test_finetune_runs_and_resumes_without_memory_or_nme(tmp_path):
    assert_resumes_identically(FAST + FINETUNE, tmp_path)
    sessions = pd.read_csv(tmp_path / "full" / "sessions.csv")
    assert sessions["acc_nme"].isna().all() and sessions["acc_nme_avg"].isna().all()
    assert not (tmp_path / "full" / "memory.csv").exists()


def test_tables_show_nme_and_memory_columns(tmp_path, capsys):
    root = tmp_path / "results"
    run_config(FAST + ICARL, root / "icarl")
    run_config(FAST + FINETUNE, root / "finetune")
    assert tables.main([str(root), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "table.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "Ā", "A_last", "Ā NME", "A_last NME", "memory", "n"
    ]  # fmt: skip
    icarl_sessions = pd.read_csv(root / "icarl" / "sessions.csv")
    icarl = next(line for line in text.splitlines() if line.startswith("| icarl"))
    cells = [c.strip() for c in icarl.strip("|").split("|")]
    assert cells[3:6] == [
        f"{icarl_sessions['acc_nme_avg'].iloc[-1]:.2f}",
        f"{icarl_sessions['acc_nme'].iloc[-1]:.2f}",
        "24",
    ]
    finetune = next(line for line in text.splitlines() if line.startswith("| finetune"))
    assert [c.strip() for c in finetune.strip("|").split("|")][3:6] == ["—", "—", "—"]
    csv = pd.read_csv(tmp_path / "out" / "table.csv", keep_default_na=False)
    assert set(csv.loc[csv["method"] == "icarl", "memory"]) == {"24"}
    assert set(csv.loc[csv["method"] == "finetune", "memory"]) == {""}
    assert tables.memory_label({"method.fixed_memory": "True", "method.memory_per_class": "20"}) == "20/class"
    latex = (tmp_path / "out" / "table.tex").read_text()
    assert r"$\bar{A}^\mathrm{NME}$" in latex and "mem." in latex and "iCaRL" in latex
    assert tables.main([str(root), "--metrics", "acc_last", "--out", str(tmp_path / "o2")]) == 0
    assert "NME" not in (tmp_path / "o2" / "table.md").read_text()
    capsys.readouterr()


def test_icarl_refuses_a_memory_that_does_not_fit():
    from pilot.errors import ConfigError

    with pytest.raises(ConfigError, match="memory_size=3 cannot keep one exemplar per class for the 4 classes"):
        tiny_learner("icarl", memory_size=3)
    assert isinstance(tiny_learner("icarl", memory_size=4), ICaRL)
