"""Device-side batch transforms against torchvision's PIL pipeline of the reference."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pilot.data.datasets import synthetic
from pilot.data.transforms import ImageTransforms, sample_crop_boxes


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return synthetic(num_classes=4, train_per_class=2, image_size=32, noise=60).train.images


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_test_transform_equals_pil_resize256_bicubic_centercrop224(images):
    ours = ImageTransforms(224).test_batch(images)
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    expected = torch.stack([ref(_pil(im)) for im in images])
    assert ours.shape == (8, 3, 224, 224)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_full_image_crop_is_a_bilinear_resize_within_one_grey_level(images):
    tf = ImageTransforms(224, train_scale=(1, 1), train_ratio=(1, 1), hflip_prob=0.0)
    ref = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor()])
    expected = torch.stack([ref(_pil(im)) for im in images])
    assert (tf.train_batch(images) - expected).abs().max() < 1.0 / 255


def test_flip_probability_one_mirrors_every_image(images):
    keep = ImageTransforms(64, train_scale=(1, 1), train_ratio=(1, 1), hflip_prob=0.0).train_batch(images)
    flip = ImageTransforms(64, train_scale=(1, 1), train_ratio=(1, 1), hflip_prob=1.0).train_batch(images)
    torch.testing.assert_close(flip, keep.flip(-1))


def test_crop_boxes_lie_inside_the_image_and_respect_scale_and_ratio():
    torch.manual_seed(0)
    top, left, h, w = sample_crop_boxes(4000, 32, 48, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 48).all()
    area = h * w / (32 * 48)
    assert area.min() >= 0.04 and area.max() <= 1.0  # rounding of h, w can dip just below 0.05
    aspect = w / h
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    assert area.std() > 0.2  # a spread of crop sizes, not one box


def test_normalisation_and_grey_to_rgb():
    grey = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = ImageTransforms(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), test_crop_pct=1.0).test_batch(grey)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
