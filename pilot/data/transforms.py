"""Image transforms, configured by ``configs/transforms/``.

In-memory uint8 datasets are transformed in batches on the compute device:
``train_batch`` = RandomResizedCrop + horizontal flip, ``test_batch`` = Resize(short side
``size / test_crop_pct``, ``test_interpolation``: bicubic, or bilinear for CODA-Prompt) + CenterCrop(``size``).
Image files take the same geometric steps on the CPU in loader workers (PIL, torchvision) and are
finished (scaled, normalised) on the device.

Reference recipe for ViTs (docs/methods.md §0.2): RRC(224, scale 0.05-1, ratio 3/4-4/3) + flip for
training; Resize(256, bicubic) + CenterCrop(224) for testing and prototype passes; inputs in [0, 1]
with no mean/std normalisation. Known difference: the reference crops CIFAR with PIL, we crop
in-memory datasets with ``roi_align`` (bilinear, adaptive sampling) on the device. The test resize
uses torch's antialiased kernels, the same as PIL's (bicubic: equal; bilinear: within one grey level).
CODA-Prompt's own transforms (``configs/transforms/coda.yaml``) resize test images bilinearly
(torchvision's default), every other method bicubically.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

TEST_INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


class ImageTransforms:
    """Train and test transforms for one input size and normalisation.

    ``test_interpolation``: the test (and prototype pass) resize, ``"bicubic"`` (the reference
    recipe) or ``"bilinear"`` (CODA-Prompt's transforms); used by :meth:`test_batch` and :meth:`test_pil`.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_scale: Sequence[float] = (0.05, 1.0),
        train_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        test_crop_pct: float = 0.875,
        test_interpolation: str = "bicubic",
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("backbone.mean and backbone.std must be both set or both null")
        if test_interpolation not in TEST_INTERPOLATIONS:
            raise ValueError(
                f"transforms.test_interpolation={test_interpolation!r}; allowed: {', '.join(TEST_INTERPOLATIONS)}"
            )
        self.size = int(size)
        self.mean = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.train_scale = (float(train_scale[0]), float(train_scale[1]))
        self.train_ratio = (float(train_ratio[0]), float(train_ratio[1]))
        self.hflip_prob = float(hflip_prob)
        self.test_resize = math.floor(self.size / test_crop_pct + 1e-6)
        self.test_interpolation = TEST_INTERPOLATIONS[test_interpolation]

    # ------------------------------------------------------------------ device side (uint8 batches)
    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0,1] float ``[B, C, H, W]`` -> float in [0,1] (or normalised), 3 channels."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous()

    def test_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Resize(short side, ``test_interpolation``) + CenterCrop, then :meth:`finish`."""
        x = TF.resize(images, [self.test_resize], interpolation=self.test_interpolation, antialias=True)
        return self.finish(TF.center_crop(x, [self.size, self.size]))

    def train_batch(self, images: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip per sample, in one batched call, then :meth:`finish`.

        Crop boxes and flips are drawn with the global torch RNG on the CPU (so a seeded run and a
        resumed run draw the same ones), then applied on the images' device.
        """
        n, _, height, width = images.shape
        top, left, h, w = sample_crop_boxes(n, height, width, self.train_scale, self.train_ratio)
        flip = torch.rand(n) < self.hflip_prob
        params = torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + w, top + h, flip.float()], dim=1)
        if images.is_cuda:  # one small pinned, non-blocking copy: the host does not wait for the GPU
            params = params.pin_memory().to(images.device, non_blocking=True)
        x = roi_align(
            images.float(), params[:, :5], output_size=self.size, spatial_scale=1.0, sampling_ratio=0, aligned=True
        )
        x = torch.where(params[:, 5].bool().view(-1, 1, 1, 1), x.flip(-1), x)
        return self.finish(x.clamp_(0, 255).div_(255))

    # ------------------------------------------------------------------- CPU side (PIL, in workers)
    def train_pil(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.train_scale, ratio=self.train_ratio, antialias=True),
                v2.RandomHorizontalFlip(self.hflip_prob),
                v2.PILToTensor(),
            ]
        )

    def test_pil(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.Resize(self.test_resize, interpolation=self.test_interpolation, antialias=True),
                v2.CenterCrop(self.size),
                v2.PILToTensor(),
            ]
        )


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], attempts: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's box sampling (torchvision's algorithm), vectorised over ``n`` samples.

    Up to ``attempts`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) draws per sample; the
    first that fits is used, otherwise the central crop with the aspect ratio clamped to ``ratio``.
    Returns float tensors ``top, left, h, w`` of shape ``[n]``.
    """
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.where(found, (torch.rand(n) * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (torch.rand(n) * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return top, left, h, w
