"""bf16 that does not move results (pilot/modules/precision.py): under bf16 autocast, forced on the
CPU here, everything after the pooled feature computes exactly what it computes in fp32 (heads,
cosine logits, EASE's ensemble and complement, Gaussian statistics, sampling, classifier alignment,
prompt selection, CODA's weights and Gram-Schmidt, SLCA's statistics pass); the statistics that still
come from bf16 features (prototypes) stay within a bound of their fp32 values.

Each "exact" test also shows the size of the error the rule avoids (the same op under plain
autocast), so that a regression to bf16 is visible as a number, not only as a failed equality.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from test_ease_slca import fit, tiny_setup, tiny_vit
from torch import nn
from torch.optim import SGD

from pilot.api import make_learner
from pilot.data.pipeline import TEST
from pilot.learners.ease import complement_prototypes, ensemble_logits
from pilot.modules.alignment import align_classifier, session_normalized_logits
from pilot.modules.classifiers import CosineLinear, class_means, linear_head
from pilot.modules.features import extract_features
from pilot.modules.gaussian import ClassGaussians, class_statistics, sample_gaussians
from pilot.modules.precision import FP32Linear, float32_compute
from pilot.modules.prompt_pools import coda_weights, cosine_similarity, gram_schmidt_slice
from pilot.runtime import Runtime


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """Runtime(precision='bf16') autocasts on the CPU too, as it does on CUDA."""
    forced = property(lambda self: torch.bfloat16 if self.precision == "bf16" else None)
    monkeypatch.setattr(Runtime, "autocast_dtype", forced)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())


# ------------------------------------------------------------------------------------ heads
def test_fp32_linear_heads_ignore_autocast():
    torch.manual_seed(0)
    x = torch.randn(64, 192)
    head = linear_head(192, 100)
    plain = nn.Linear(192, 100)
    plain.load_state_dict(head.state_dict())
    reference = plain(x)
    with bf16():
        ours, rounded = head(x), plain(x)
    assert isinstance(head, FP32Linear) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert rounded.dtype == torch.bfloat16 and max_rel(rounded, reference) > 1e-3  # what a bf16 head does


def test_cosine_logits_ignore_autocast():
    torch.manual_seed(0)
    head = CosineLinear(192, learn_sigma=False)
    head.grow(50)
    head.assign(range(50), torch.randn(50, 192) + 2.0)  # shared offset: cosines near 0.9, where ties hide
    x = torch.randn(128, 192) + 2.0
    reference = head(x)
    with bf16():
        ours = head(x)
        rounded = torch.nn.functional.linear(
            torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(head.weight, dim=1)
        )
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert (rounded.float() - reference).abs().max() > 5e-4  # bf16 steps of ~2^-9 near cos 0.9


def test_ease_ensemble_and_complement_ignore_autocast():
    torch.manual_seed(0)
    prototypes = torch.randn(9, 3, 48) + 1.0
    features = torch.randn(16, 3, 48) + 1.0
    sessions = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    ref_logits = ensemble_logits(features, prototypes, sessions, alpha=0.1)
    ref_complement = complement_prototypes(prototypes, [0, 3, 6, 9])
    with bf16():
        logits = ensemble_logits(features, prototypes, sessions, alpha=0.1)
        complement = complement_prototypes(prototypes, [0, 3, 6, 9])
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(complement, ref_complement, rtol=0, atol=0)


# -------------------------------------------------------------------------- statistics
def test_gaussian_statistics_and_sampling_ignore_autocast():
    torch.manual_seed(0)
    feats, labels = torch.randn(120, 32), torch.arange(4).repeat_interleave(30)
    means, covs = class_statistics(feats, labels, range(4))
    tril = torch.linalg.cholesky(covs)
    draw = partial(sample_gaussians, means, tril, 64, torch.tensor([0.9, 0.95, 1.0, 1.0]))
    reference = draw(generator=torch.Generator().manual_seed(1))[0]
    with bf16():
        means_b, covs_b = class_statistics(feats, labels, range(4))
        samples = draw(generator=torch.Generator().manual_seed(1))[0]
        rounded = torch.baddbmm(
            means[:1].float().unsqueeze(1), torch.randn(1, 64, 32), tril[:1].float().transpose(1, 2)
        )
    assert (means_b.dtype, covs_b.dtype, samples.dtype) == (torch.float64, torch.float64, torch.float32)
    torch.testing.assert_close((means_b, covs_b, samples), (means, covs, reference), rtol=0, atol=0)
    assert rounded.dtype == torch.bfloat16  # what sampling would do inside autocast without the rule


def test_logit_normalisation_and_classifier_alignment_ignore_autocast():
    torch.manual_seed(0)
    logits = torch.randn(32, 6) * 5
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    with bf16():
        normalised = session_normalized_logits(logits, blocks, tau=0.1)
    torch.testing.assert_close(normalised, session_normalized_logits(logits, blocks, tau=0.1), rtol=0, atol=0)

    gaussians = ClassGaussians(16)
    gaussians.grow(6)
    gaussians.update(
        torch.randn(120, 16) + torch.arange(6).repeat_interleave(20)[:, None],
        torch.arange(6).repeat_interleave(20),
        range(6),
    )
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)

    def aligned(autocast: bool) -> torch.Tensor:
        torch.manual_seed(3)
        head = FP32Linear(16, 6)
        args = dict(blocks=blocks, scale_sessions=blocks, current_session=2, epochs=2, runtime=runtime)
        with bf16() if autocast else torch.autocast("cpu", enabled=False):
            align_classifier(head, gaussians, optimizer=partial(SGD, lr=0.01, momentum=0.9), **args)
        return head.weight.detach()

    torch.testing.assert_close(aligned(True), aligned(False), rtol=0, atol=0)


# ------------------------------------------------------------------------------ prompts
def test_prompt_selection_and_coda_weights_ignore_autocast():
    torch.manual_seed(0)
    query, keys, attention = torch.randn(8, 48), torch.randn(5, 12, 48), torch.randn(5, 12, 48)
    ref = (cosine_similarity(query, keys[0]), coda_weights(query, attention, keys))
    matrix = torch.zeros(12, 48)
    torch.manual_seed(1)
    ref_gs = gram_schmidt_slice(matrix, 0, 4)
    with bf16():
        ours = (cosine_similarity(query, keys[0]), coda_weights(query, attention, keys))
        torch.manual_seed(1)
        gs = gram_schmidt_slice(matrix, 0, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(gs, ref_gs, rtol=0, atol=0)
    torch.testing.assert_close(gs[:4] @ gs[:4].T, torch.eye(4), rtol=0, atol=1e-6)


def test_float32_compute_decorator_keeps_float32_inside_autocast():
    @float32_compute
    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with bf16():
        assert product(a, b).dtype == torch.float32 and (a @ b).dtype == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")  # restored after the call


# --------------------------------------------------------------- learners in a bf16 run
def test_slca_statistics_pass_runs_in_fp32_in_a_bf16_run(bf16_on_cpu):
    """The class means and covariances of a bf16 run equal those of an fp32 run on the same weights,
    and the covariances a bf16 pass would give are measurably off (the error the fp32 pass avoids)."""
    stats = {}
    for precision in ("bf16", "fp32"):
        runtime, scenario, pipeline = tiny_setup(num_classes=4)
        runtime.precision = precision
        learner = make_learner("slca", tiny_vit(), scenario, runtime, epochs=0, ca_epochs=0)
        fit(learner, pipeline, scenario.sessions[0])
        logits = learner.predict(next(iter(pipeline.batches(TEST, range(2), 8))))
        stats[precision] = (learner.stats.means.clone(), learner.stats.covs.clone(), logits)
        assert logits.dtype == torch.float32
    torch.testing.assert_close(stats["bf16"], stats["fp32"], rtol=0, atol=0)  # statistics and test logits

    # The same pass under autocast: features within 2% (bf16 matmuls through 6 blocks), and the
    # covariances it would give off by a measurable amount.
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    backbone = tiny_vit().eval()
    batches = list(pipeline.session(scenario.sessions[0]).prototype_batches(64))
    feats, labels = extract_features(backbone, batches, runtime, full_precision=True)
    with bf16():
        rounded = torch.cat([backbone(b.images).float() for b in batches])
    assert 1e-3 < max_rel(rounded, feats) < 2e-2
    covs = class_statistics(feats, labels, range(2))[1]
    covs_bf16 = class_statistics(rounded, labels, range(2))[1]
    assert max_rel(covs_bf16, covs) > 1e-3


def test_prototypes_from_bf16_features_stay_within_a_bound():
    """SimpleCIL/EASE prototypes come from features of the run's precision (as do the test features
    they are compared with). Their bf16 error is bounded: cosine to the fp32 prototype >= 0.9999."""
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    backbone = tiny_vit().eval()
    info = scenario.sessions[0]
    batches = list(pipeline.session(info).prototype_batches(64))
    feats, labels = extract_features(backbone, batches, runtime, full_precision=True)
    with torch.inference_mode(), bf16():
        rounded = torch.cat([backbone(b.images).float() for b in batches])
    exact, approx = class_means(feats, labels, info.new_classes), class_means(rounded, labels, info.new_classes)
    cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=1)
    assert cosine.min() >= 0.9999
    assert 0 < max_rel(approx, exact) < 1e-2
    assert not math.isclose(float(cosine.min()), 1.0, abs_tol=1e-9)  # the features really were bf16
