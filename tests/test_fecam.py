"""FeCAM: shrinkage, normalisation and Mahalanobis scores (pilot/modules/mahalanobis.py) against direct
computations here (torch.cov / torch.corrcoef / pinv for PILOT's recipe, numpy for the official one),
the learner's logits on the tiny ViT for both ``covariance`` values, configs, end to end with resume."""

from __future__ import annotations

import numpy as np
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
from pilot.modules.features import extract_features
from pilot.modules.mahalanobis import ClassMahalanobis, row_correlation, shrink_scaled

D = 48  # tiny ViT width


def pilot_distances(train, labels, test, classes, alpha=100.0) -> torch.Tensor:
    """LAMDA-PILOT's recipe written out: torch.cov of raw features, + alpha I, torch.corrcoef, pinv."""
    out = []
    for c in classes:
        x = train[labels == c].double()
        corr = torch.corrcoef(torch.cov(x.T) + alpha * torch.eye(x.shape[1], dtype=torch.float64))
        diff = F.normalize(test.double(), dim=1) - F.normalize(x.mean(0), dim=0)
        out.append(torch.diagonal(diff @ torch.linalg.pinv(corr) @ diff.T))
    return torch.stack(out, dim=1)


def official_shrink(cov: np.ndarray, gamma1: float, gamma2: float) -> np.ndarray:
    off = cov.copy()
    np.fill_diagonal(off, 0.0)
    mask = off != 0.0
    eye = np.eye(cov.shape[0])
    return cov + gamma1 * np.mean(np.diagonal(cov)) * eye + gamma2 * (off * mask).sum() / mask.sum() * (1 - eye)


def paper_distances(train, labels, test, classes, gamma1=1.0, gamma2=0.0) -> np.ndarray:
    """The official FeCAM ViT recipe in numpy: normalised features, np.cov, shrink, cov / (s s^T), pinv."""
    x_all = F.normalize(train.double(), dim=1).numpy()
    q = F.normalize(test.double(), dim=1).numpy()
    out = []
    for c in classes:
        x = x_all[labels.numpy() == c]
        cov = official_shrink(np.cov(x.T), gamma1, gamma2)
        sd = np.sqrt(np.diagonal(cov))
        diff = q - x.mean(0)
        out.append(np.diagonal(diff @ np.linalg.pinv(cov / np.outer(sd, sd)) @ diff.T))
    return np.stack(out, axis=1)


def blobs(seed: int = 0, n: int = 30, dim: int = 10, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    spread = torch.rand(dim, generator=g)  # unequal spread per dimension
    feats = torch.randn(k, dim, generator=g)[labels] * 2 + torch.randn(n, dim, generator=g) * spread
    return feats, labels, torch.randn(7, dim, generator=g)


def test_pilot_recipe_scores_equal_a_direct_computation():
    feats, labels, test = blobs()
    store = ClassMahalanobis(10, "pilot", alpha=100.0)
    store.grow(3)
    store.update(feats[labels < 2], labels[labels < 2], range(0, 2))  # two sessions
    store.update(feats[labels == 2], labels[labels == 2], range(2, 3))
    expected = pilot_distances(feats, labels, test, range(3))
    torch.testing.assert_close(store(test).double(), expected, rtol=1e-5, atol=1e-5)
    # the matrix is singular (rows of a centred matrix), which is why the reference needs pinv
    corr = torch.corrcoef(torch.cov(feats[labels == 0].T.double()) + 100 * torch.eye(10, dtype=torch.float64))
    assert torch.linalg.matrix_rank(corr) == 9
    assert store(test).argmin(1).tolist() == expected.argmin(1).tolist()


@pytest.mark.parametrize("gamma2", [0.0, 1.0])
def test_paper_recipe_scores_equal_the_official_numpy_computation(gamma2):
    feats, labels, test = blobs(1)
    store = ClassMahalanobis(10, "paper", gamma1=1.0, gamma2=gamma2)
    store.grow(3)
    store.update(feats, labels, range(3))
    expected = paper_distances(feats, labels, test, range(3), 1.0, gamma2)
    np.testing.assert_allclose(store(test).double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, pilot_distances(feats, labels, test, range(3)).numpy(), rtol=0.1)


def test_shrinkage_and_row_correlation_pieces():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T
    np.testing.assert_allclose(shrink_scaled(cov, 0.5, 2.0).numpy(), official_shrink(cov.numpy(), 0.5, 2.0), rtol=1e-12)
    mats = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    for m, r in zip(mats, row_correlation(mats)):
        torch.testing.assert_close(r, torch.corrcoef(m), rtol=1e-12, atol=1e-12)


def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=D, depth=6, num_heads=3)
    return create_timm_backbone("vit_tiny_patch16_224", pretrained=False, input_size=32, model_kwargs=kwargs)


@pytest.mark.parametrize("covariance", ["pilot", "paper"])
def test_learner_logits_are_minus_the_direct_mahalanobis_distances(covariance):
    torch.set_num_threads(2)
    runtime = make_runtime_cpu()
    scenario = make_scenario(6, 2, 2)
    pipeline = DataPipeline(synthetic(num_classes=6, train_per_class=40), scenario, ImageTransforms(32), runtime)
    learner = make_learner("fecam", tiny_vit(), scenario, runtime, epochs=1, batch_size=16, covariance=covariance)
    for info in scenario.sessions:
        learner.train()
        learner.fit(pipeline.session(info))
        learner.eval()
    assert not any(p.requires_grad for p in learner.parameters())
    assert learner.classes.precisions.shape == (6, D, D)
    feats, labels = extract_features(learner.tuned_features, pipeline.batches(TRAIN, range(6), 50), runtime)
    batch = next(iter(pipeline.batches(TEST, range(6), 24)))
    test = learner.tuned_features(batch.images)
    if covariance == "pilot":
        expected = -pilot_distances(feats, labels, test, range(6))
    else:
        expected = -torch.from_numpy(paper_distances(feats, labels, test, range(6)))
    logits = learner.predict(batch)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()
    torch.testing.assert_close(learner.predict(batch), logits)  # from the feature cache


def make_runtime_cpu():
    from pilot.runtime import make_runtime

    return make_runtime(device="cpu", progress=False, channels_last=False)


def test_config_holds_the_reference_values():
    for dataset, expected in (("cifar100", (20, 48, 0.01, 5e-4)), ("imagenet_r", (10, 16, 0.05, 5e-3))):
        m = OmegaConf.to_container(compose_config(["+method=fecam", f"dataset={dataset}"]).method, resolve=True)
        assert (m["epochs"], m["batch_size"], m["optimizer"]["lr"], m["optimizer"]["weight_decay"]) == expected
        fecam = (m["covariance"], m["shrink"], m["gamma1"], m["gamma2"], m["adapter_dim"])
        assert fecam == ("pilot", 100.0, 1.0, 0.0, 64)


def test_runs_and_resumes_identically(tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides("fecam"), tmp_path)
