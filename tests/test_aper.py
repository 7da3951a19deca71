"""APER and the session-0 tuning base (pilot/learners/first_session.py): prototypes computed in the test,
frozen PETs after session 0, the untouched pretrained branch of APER-Finetune, parameter counts, configs,
end to end with resume."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from test_registry import TWO_SESSIONS, assert_resumes_identically, small_overrides
from torch.optim import SGD

from pilot.api import make_learner
from pilot.backbones.adapters import AdapterSet, adapters_active
from pilot.backbones.backbone import Backbone
from pilot.backbones.factory import create_timm_backbone
from pilot.data.datasets import synthetic
from pilot.data.pipeline import TEST, TRAIN, DataPipeline
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms
from pilot.errors import IncompatibleBackboneError
from pilot.learners.aper import AperAdapter, AperSSF, AperVPTDeep, AperVPTShallow
from pilot.modules.classifiers import class_means
from pilot.modules.features import extract_features
from pilot.runtime import make_runtime

D, DEPTH, HIDDEN = 48, 6, 192  # the tiny ViT: width, blocks, MLP width


def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return create_timm_backbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        input_size=32,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=3),
    )


def tiny_setup(num_classes: int = 6):
    runtime = make_runtime(device="cpu", progress=False, channels_last=False)
    scenario = make_scenario(num_classes, 2, 2)
    pipeline = DataPipeline(synthetic(num_classes=num_classes), scenario, ImageTransforms(32), runtime)
    return runtime, scenario, pipeline


def fit(learner, pipeline, info) -> None:
    learner.train()
    learner.fit(pipeline.session(info))
    learner.eval()


def snapshot(learner) -> dict[str, torch.Tensor]:
    """Everything the learner learns except the prototype rows (and the frozen backbone)."""
    return {k: v.clone() for k, v in learner.state_dict().items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def adapter_three_sessions():
    """APER-Adapter on the tiny ViT: the state before training, after session 0, after sessions 1 and 2."""
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup()
    learner = make_learner("aper_adapter", tiny_vit(), scenario, runtime, epochs=2, batch_size=16)
    states = [snapshot(learner)]
    trainable = []
    for info in scenario.sessions:
        fit(learner, pipeline, info)
        states.append(snapshot(learner))
        trainable.append(learner.trainable_parameters)
    return learner, scenario, pipeline, runtime, states, trainable


def test_prototypes_are_class_means_of_pretrained_then_tuned_features(adapter_three_sessions):
    learner, scenario, pipeline, runtime, _, _ = adapter_three_sessions
    vit, pet = learner.backbone.vit, learner.pet
    assert isinstance(pet, AdapterSet)

    def pretrained(x):
        return learner.backbone(x)

    def tuned(x):
        with adapters_active(vit, [pet]):
            return learner.backbone(x)

    assert learner.head.weight.shape == (6, 2 * D)
    for info in scenario.sessions:
        batches = lambda: pipeline.batches(TRAIN, info.new_classes, 7)  # noqa: E731
        f_pre, labels = extract_features(pretrained, batches(), runtime)
        f_tuned, _ = extract_features(tuned, batches(), runtime)
        rows = learner.head.weight[info.new_classes.start : info.new_classes.stop]
        # the original branch first (reference MultiBranchCosineIncrementalNet: backbones [pretrained, tuned])
        torch.testing.assert_close(rows[:, :D], class_means(f_pre, labels, info.new_classes), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rows[:, D:], class_means(f_tuned, labels, info.new_classes), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(learner.head.weight[:, :D], learner.head.weight[:, D:], atol=1e-3)  # PET changed f

    # predict = sigma 1 * cosine to the prototypes of [f_pre ; f_tuned]
    batch = next(iter(pipeline.batches(TEST, range(6), 20)))
    g = torch.cat([pretrained(batch.images), tuned(batch.images)], dim=1)
    expected = F.normalize(g, dim=1) @ F.normalize(learner.head.weight, dim=1).T
    torch.testing.assert_close(learner.predict(batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(learner.predict(batch), expected, rtol=1e-5, atol=1e-5)  # from the feature cache


def test_only_session_zero_tunes_the_adapter_and_the_head(adapter_three_sessions):
    learner, _, _, _, states, trainable = adapter_three_sessions
    before, after0, after1, after2 = states
    up = "pet.adapters.0.up.weight"
    assert before[up].abs().sum() == 0 and after0[up].abs().sum() > 0  # up projections start at zero
    assert before["first_head.weight"].shape == (0, D) and after0["first_head.weight"].shape == (2, D)
    assert after0["first_head.sigma"].item() != 1.0  # sigma is learned in session 0
    for key in after0:
        assert torch.equal(after1[key], after0[key]) and torch.equal(after2[key], after0[key]), key
    # session 0: 6 adapters (48 -> 64 -> 48) + the cosine head over 2 classes + sigma; then nothing
    assert trainable == [DEPTH * (D * 64 + 64 + 64 * D + D) + 2 * D + 1, 0, 0]
    assert not any(p.requires_grad for p in learner.parameters())
    assert not any(k.startswith("backbone.") for k in learner.state_dict())  # frozen ViT not checkpointed


def test_finetune_keeps_an_untouched_pretrained_branch():
    torch.set_num_threads(2)
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    backbone = tiny_vit()
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    learner = make_learner("aper_finetune", backbone, scenario, runtime, epochs=1, batch_size=16)
    batch = next(iter(pipeline.batches(TEST, range(4), 8)))
    learner.eval()
    with torch.no_grad():  # a copy: both branches agree before training
        torch.testing.assert_close(learner.tuned_features(batch.images), learner.pretrained_features(batch.images))
    fit(learner, pipeline, scenario.sessions[0])
    assert learner.trainable_parameters == backbone.num_parameters() + 2 * D + 1
    tuned_after0 = {k: v.clone() for k, v in learner.tuned_backbone.state_dict().items()}
    fit(learner, pipeline, scenario.sessions[1])
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, original[key]), key  # the pretrained branch never trains
        assert torch.equal(learner.tuned_backbone.state_dict()[key], tuned_after0[key]), key  # frozen after s0
    assert any(not torch.equal(tuned_after0[k], original[k]) for k in original)  # session 0 did train the copy
    state = learner.state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert {k.removeprefix("tuned_backbone.") for k in state if k.startswith("tuned_backbone.")} == set(original)
    with torch.no_grad():
        torch.testing.assert_close(learner.pretrained_features(batch.images), tiny_vit()(batch.images))


@pytest.mark.parametrize(
    "cls, pet_params",
    [
        (AperAdapter, DEPTH * (D * 64 + 64 + 64 * D + D)),
        # SSF: scale + shift after the patch projection, norm1, qkv, proj, norm2, fc1, fc2 of each block, final norm
        (AperSSF, 2 * (D + DEPTH * (D + 3 * D + D + D + HIDDEN + D) + D)),
        (AperVPTShallow, 5 * D),
        (AperVPTDeep, DEPTH * 5 * D),
    ],
)
def test_session_zero_trains_the_pet_and_the_head_only(cls, pet_params):
    runtime, scenario, _ = tiny_setup()
    learner = cls.create(tiny_vit(), scenario, runtime, optimizer=partial(SGD, lr=0.01))
    learner.begin_session(scenario.sessions[0])
    trainable = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    assert trainable == pet_params + 2 * D + 1
    assert sum(p.numel() for p in learner.tuned_parameters()) == pet_params
    if cls is AperAdapter:  # a fresh adapter set computes the pretrained model (up projection at zero)
        images = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(learner.branch_features(images)[:, D:], learner.backbone(images))


def test_pets_refuse_a_cnn_and_finetune_accepts_one():
    runtime, scenario, pipeline = tiny_setup(num_classes=4)
    torch.manual_seed(0)
    resnet = Backbone(
        timm.create_model("resnet18", pretrained=False, num_classes=0), "resnet18", 32, None, None, pretrained=False
    )
    for cls in (AperAdapter, AperSSF, AperVPTShallow, AperVPTDeep):
        with pytest.raises(IncompatibleBackboneError):
            cls.create(resnet, scenario, runtime, optimizer=partial(SGD, lr=0.01))
    learner = make_learner("aper_finetune", resnet, scenario, runtime, epochs=1, batch_size=32)
    fit(learner, pipeline, scenario.sessions[0])
    assert learner.head.weight.shape == (2, 2 * 512)
    assert not learner.tuned_backbone.training  # frozen in eval mode after session 0 (BatchNorm fixed)


@pytest.mark.parametrize(
    "method, cifar, imagenet_r",
    [  # (epochs, batch, lr, weight decay[, tokens]) from exps/aper_*.json and *_inr.json
        ("aper_adapter", (20, 48, 0.01, 5e-4), (10, 16, 0.05, 5e-3)),
        ("aper_ssf", (20, 48, 0.01, 5e-4), (20, 48, 0.01, 5e-4)),
        ("aper_vpt_deep", (20, 48, 0.01, 5e-4, 5), (20, 24, 0.05, 5e-4, 30)),
        ("aper_vpt_shallow", (20, 48, 0.01, 5e-4, 5), (20, 24, 0.03, 5e-3, 30)),  # the _inr numbers, shallow
        ("aper_finetune", (6, 128, 0.01, 0.05), (5, 144, 0.01, 5e-3)),
    ],
)
def test_configs_hold_the_reference_values(method, cifar, imagenet_r):
    for dataset, expected in (("cifar100", cifar), ("imagenet_r", imagenet_r)):
        m = OmegaConf.to_container(compose_config([f"+method={method}", f"dataset={dataset}"]).method, resolve=True)
        values = (m["epochs"], m["batch_size"], m["optimizer"]["lr"], m["optimizer"]["weight_decay"])
        values += (m["prompt_tokens"],) if "prompt_tokens" in m else ()
        assert values == expected, dataset
        assert m["scheduler"]["T_max"] == m["epochs"] and m["scheduler"]["eta_min"] == 0.0
        assert m["optimizer"]["momentum"] == 0.9


@pytest.mark.parametrize("method", ["aper_adapter", "aper_finetune"])
def test_runs_and_resumes_identically(method, tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides(method), tmp_path)
