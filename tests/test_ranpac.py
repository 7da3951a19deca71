"""RanPAC: the running ridge statistics (pilot/modules/ridge.py) against closed forms computed here
(least squares on the stacked features of every session so far), the reference's lambda search
against a direct one, the learner's readout and logits on the tiny ViT, configs, end to end with resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides

from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.backbones.factory import create_timm_backbone
from pilot.data.datasets import synthetic
from pilot.data.pipeline import TEST, TRAIN, DataPipeline
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms
from pilot.errors import ConfigError
from pilot.modules.features import extract_features
from pilot.modules.ridge import RIDGE_CANDIDATES, RidgeStatistics, select_ridge
from pilot.runtime import make_runtime

D, M = 48, 64  # tiny ViT width, projection size in these tests
SMALL = ["method.projection_dim=64"]


def ridge_by_lstsq(h: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||h W - y||^2 + lam ||W||^2 as an ordinary least-squares problem on [h; sqrt(lam) I]."""
    m = h.shape[1]
    a = torch.cat([h.double(), lam**0.5 * torch.eye(m, dtype=torch.float64)])
    b = torch.cat([y.double(), torch.zeros(m, y.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def direct_search(h: torch.Tensor, y: torch.Tensor, fraction: float = 0.8) -> tuple[float, list[float]]:
    n = int(h.shape[0] * fraction)
    errors = [h[n:].double() @ ridge_by_lstsq(h[:n], y[:n], lam) - y[n:] for lam in RIDGE_CANDIDATES]
    losses = [float((e**2).mean()) for e in errors]
    return RIDGE_CANDIDATES[losses.index(min(losses))], losses


def planted(seed: int, n: int = 60, m: int = 40, k: int = 5, used: int = 3):
    """Features with class structure (labels < used of k classes) and noise: lambda has an interior optimum."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, used, (n,), generator=g)
    centres = torch.randn(used, m, generator=g)
    feats = centres[labels] * 0.5 + torch.randn(n, m, generator=g)
    return feats, labels


def test_running_sums_add_up_and_solve_the_stacked_ridge_problem():
    g = torch.Generator().manual_seed(0)
    stats = RidgeStatistics(12, 30, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(stats.projection, torch.randn(12, 30, generator=torch.Generator().manual_seed(7)))
    f1, f2 = torch.randn(20, 12, generator=g), torch.randn(15, 12, generator=g)
    y1, y2 = torch.randint(0, 2, (20,), generator=g), torch.randint(2, 4, (15,), generator=g)
    stats.update(f1, y1)
    gram1 = stats.gram.clone()
    stats.update(f2, y2)
    h = F.relu(torch.cat([f1, f2]).double() @ stats.projection.double())
    y = F.one_hot(torch.cat([y1, y2]), 5).double()
    assert stats.gram.dtype == stats.targets.dtype == torch.float64
    torch.testing.assert_close(stats.gram, h.T @ h, rtol=1e-12, atol=1e-10)  # G of the concatenation
    torch.testing.assert_close(stats.targets, h.T @ y, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.gram - gram1, h[20:].T @ h[20:], rtol=1e-12, atol=1e-10)  # only adds
    assert stats.targets[:, 4].abs().sum() == 0  # a class never seen keeps a zero column
    for lam in (1e-2, 1.0, 100.0):
        torch.testing.assert_close(stats.solve(lam), ridge_by_lstsq(h, y, lam), rtol=1e-7, atol=1e-9)


def test_lambda_search_picks_what_a_direct_search_picks():
    for seed in range(3):
        feats, labels = planted(seed)
        h, y = feats.relu().double(), F.one_hot(labels, 5).double()
        chosen, losses = select_ridge(h, y)
        expected, expected_losses = direct_search(h, y)
        assert chosen == expected == 10.0  # interior optimum: neither end of 1e-8 .. 1e8
        torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    h, y = torch.zeros(10, 4, dtype=torch.float64), F.one_hot(torch.arange(10) % 2, 2).double()
    assert select_ridge(h, y)[0] == 1e-8  # every candidate ties: the first one, as np.argmin


def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=D, depth=6, num_heads=3)
    return create_timm_backbone("vit_tiny_patch16_224", pretrained=False, input_size=32, model_kwargs=kwargs)


@pytest.fixture(scope="module")
def three_sessions():
    """RanPAC (M = 64) on the tiny ViT, 6 classes in 3 sessions; the RNG state before the last end_session."""
    torch.set_num_threads(2)
    runtime = make_runtime(device="cpu", progress=False, channels_last=False)
    scenario = make_scenario(6, 2, 2)
    pipeline = DataPipeline(synthetic(num_classes=6), scenario, ImageTransforms(32), runtime)
    learner = make_learner(
        "ranpac", tiny_vit(), scenario, runtime, epochs=1, batch_size=16, projection_dim=M, prototype_batch_size=9
    )
    rng = None
    for info in scenario.sessions:
        session = pipeline.session(info)
        learner.train()
        learner.begin_session(info)
        learner.train_session(session)
        rng = torch.get_rng_state()
        learner.end_session(session)
        learner.eval()
    return learner, scenario, pipeline, runtime, rng


def test_learner_statistics_readout_and_logits_are_the_closed_forms(three_sessions):
    learner, scenario, pipeline, runtime, _ = three_sessions
    feats, labels = extract_features(learner.tuned_features, pipeline.batches(TRAIN, range(6), 10), runtime)
    h = F.relu(feats.double() @ learner.statistics.projection.double())
    y = F.one_hot(labels, 6).double()
    torch.testing.assert_close(learner.statistics.gram, h.T @ h, rtol=1e-5, atol=1e-4)  # all three sessions
    torch.testing.assert_close(learner.statistics.targets, h.T @ y, rtol=1e-5, atol=1e-4)
    lam = float(learner.ridge)
    assert lam in RIDGE_CANDIDATES
    expected = ridge_by_lstsq(h, y, lam).T.float()
    assert learner.readout.shape == (6, M)
    torch.testing.assert_close(learner.readout, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))

    batch = next(iter(pipeline.batches(TEST, range(6), 12)))
    h_test = F.relu(learner.tuned_features(batch.images) @ learner.statistics.projection)
    sigma = learner.first_head.sigma
    assert sigma is not None and float(sigma) != 1.0  # the session-0 head's trained scale, carried over
    cosine = sigma * F.normalize(h_test, dim=1) @ F.normalize(learner.readout, dim=1).T
    torch.testing.assert_close(learner.predict(batch), cosine, rtol=1e-5, atol=1e-5)
    learner.scoring = "raw"
    try:
        torch.testing.assert_close(learner.predict(batch), h_test @ learner.readout.T, rtol=1e-4, atol=1e-4)
    finally:
        learner.scoring = "cosine"


def test_lambda_is_searched_on_the_last_session_in_shuffled_order(three_sessions):
    learner, scenario, pipeline, runtime, rng = three_sessions
    torch.set_rng_state(rng)  # the same permutation as the learner's pass
    info = scenario.sessions[-1]
    stream = pipeline.batches(TRAIN, info.new_classes, 9, augment=False, shuffle=True)
    feats, labels = extract_features(learner.tuned_features, stream, runtime)
    assert labels.tolist() != sorted(labels.tolist())  # shuffled, not class-sorted
    h = F.relu(feats.double() @ learner.statistics.projection.double())
    expected, _ = direct_search(h, F.one_hot(labels, 6).double())
    assert float(learner.ridge) == expected


def test_only_session_zero_trains_and_the_projection_is_fixed(three_sessions):
    learner, *_ = three_sessions
    assert not any(p.requires_grad for p in learner.parameters())
    state = learner.state_dict()
    assert {"statistics.projection", "statistics.gram", "statistics.targets", "readout", "ridge"} <= set(state)
    assert not any(k.startswith("backbone.") for k in state)
    assert state["statistics.gram"].shape == (M, M) and state["statistics.targets"].shape == (M, 6)
    runtime, scenario = make_runtime(device="cpu", progress=False), make_scenario(4, 2, 2)
    fixed = [
        make_learner("ranpac", tiny_vit(), scenario, runtime, projection_dim=8, projection_seed=5) for _ in range(2)
    ]
    torch.testing.assert_close(fixed[0].statistics.projection, fixed[1].statistics.projection)
    with pytest.raises(ConfigError, match="ridge_fit_fraction"):
        make_learner("ranpac", tiny_vit(), scenario, runtime, projection_dim=8, ridge_fit_fraction=1.0)


def test_config_holds_the_reference_values():
    for dataset, expected in (("cifar100", (20, 48, 0.01, 5e-4)), ("imagenet_r", (10, 16, 0.05, 5e-3))):
        m = OmegaConf.to_container(compose_config(["+method=ranpac", f"dataset={dataset}"]).method, resolve=True)
        assert (m["epochs"], m["batch_size"], m["optimizer"]["lr"], m["optimizer"]["weight_decay"]) == expected
        assert m["projection_dim"] == 10000 and m["adapter_dim"] == 64 and m["scoring"] == "cosine"
        assert m["ridge_candidates"] == [10.0**k for k in range(-8, 9)] and m["ridge_fit_fraction"] == 0.8


def test_runs_and_resumes_identically(tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides("ranpac") + SMALL, tmp_path)
