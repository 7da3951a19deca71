"""The test resize's interpolation: bicubic (reference recipe) or bilinear (CODA-Prompt's transforms)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_config
from PIL import Image
from torchvision import transforms as T

from pilot.data.transforms import ImageTransforms


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 32, 40), dtype=torch.uint8, generator=g)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _reference(images: torch.Tensor, resize: int, crop: int, mode: T.InterpolationMode) -> torch.Tensor:
    ref = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop), T.ToTensor()])
    return torch.stack([ref(_pil(im)) for im in images])


@pytest.mark.parametrize("size, crop_pct", [(224, 0.875), (224, 1.0), (48, 0.875)])
def test_bilinear_tensor_path_equals_pil_within_one_grey_level(images, size, crop_pct):
    tf = ImageTransforms(size, test_crop_pct=crop_pct, test_interpolation="bilinear")
    ours = tf.test_batch(images)
    expected = _reference(images, tf.test_resize, size, T.InterpolationMode.BILINEAR)
    assert ours.shape == (4, 3, size, size)
    assert (ours - expected).abs().max() <= 1.0 / 255 + 1e-6


def test_bilinear_pil_path_equals_torchvision_pil_pipeline(images):
    tf = ImageTransforms(224, test_interpolation="bilinear")
    ours = torch.stack([tf.test_pil()(_pil(im)) for im in images]).float() / 255
    expected = _reference(images, 256, 224, T.InterpolationMode.BILINEAR)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_bicubic_stays_the_default_and_equals_pil(images):
    tf = ImageTransforms(224)
    expected = _reference(images, 256, 224, T.InterpolationMode.BICUBIC)
    torch.testing.assert_close(tf.test_batch(images), expected, atol=1e-6, rtol=0)
    ours_pil = torch.stack([tf.test_pil()(_pil(im)) for im in images]).float() / 255
    torch.testing.assert_close(ours_pil, expected, atol=1e-6, rtol=0)


def test_bilinear_and_bicubic_differ(images):
    bilinear = ImageTransforms(224, test_interpolation="bilinear")
    bicubic = ImageTransforms(224, test_interpolation="bicubic")
    assert (bilinear.test_batch(images) - bicubic.test_batch(images)).abs().max() > 4.0 / 255
    a = bilinear.test_pil()(_pil(images[0])).float()
    b = bicubic.test_pil()(_pil(images[0])).float()
    assert (a - b).abs().max() > 4


def test_invalid_interpolation_names_the_allowed_values():
    with pytest.raises(ValueError, match="bicubic") as err:
        ImageTransforms(224, test_interpolation="nearest")
    assert "bilinear" in str(err.value) and "nearest" in str(err.value)


@pytest.mark.parametrize(
    "method, dataset, expected",
    [
        ("coda", "cifar100", ("bilinear", [0.08, 1.0], 1.0)),
        ("coda", "imagenet_r", ("bilinear", [0.08, 1.0], 0.875)),
        # LAMDA-PILOT gives CODA its own transforms on CIFAR-100 and ImageNet-R only.
        ("coda", "cub", ("bicubic", [0.05, 1.0], 0.875)),
        ("coda", "synthetic", ("bicubic", [0.05, 1.0], 0.875)),
        ("l2p", "cifar100", ("bicubic", [0.05, 1.0], 0.875)),
    ],
)
def test_configs_choose_the_methods_transforms(tmp_path, method, dataset, expected):
    cfg = compose_config(FAST + [f"+method={method}", f"dataset={dataset}"], tmp_path)
    t = cfg.transforms
    assert (t.test_interpolation, list(t.train_scale), t.test_crop_pct) == expected


def test_coda_test_interpolation_is_switchable(tmp_path):
    cfg = compose_config(FAST + ["+method=coda", "transforms.test_interpolation=bicubic"], tmp_path)
    assert cfg.transforms.test_interpolation == "bicubic"
