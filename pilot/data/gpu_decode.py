"""Image files decoded on the compute device: loader workers only read bytes, the main process decodes.

For folder (JPEG) datasets PIL decoding in loader workers bounds training at a fraction of what a GPU
consumes (issue 16: ~300 images/s per core against ~12,500 images/s for nvJPEG decode + resize). With
``runtime.gpu_decode`` (``auto``: when the device is CUDA and the dataset is files; ``on``; ``off``)::

    worker:  JPEG file -> its bytes
             any other file (PNG, ...) -> decoded by PIL, uint8 [3, H, W] (the CPU decoder, per file)
             a batch -> one flat uint8 buffer + offsets (one shared-memory block crosses to the main process)
    main:    decode_jpeg(the batch's bytes, device)          nvJPEG on CUDA (libjpeg-turbo on a CPU)
             train: per image a RandomResizedCrop box (scale, ratio: torchvision's sampling, drawn from the
                    global torch RNG) cropped and resized to S x S (bilinear, antialiased), flipped with
                    probability hflip_prob
             test:  resize the short side to floor(S / test_crop_pct) (test_interpolation, antialiased),
                    centre crop S x S
             stack -> uint8 [B, 3, S, S] -> ImageTransforms.finish (scale to [0, 1], normalise)

The same geometric steps as the CPU path (:meth:`ImageTransforms.train_pil` / ``test_pil``), on tensors:
images differ from PIL's by the decoders' rounding and the resize kernels' (a few grey levels at most;
see tests/test_gpu_decode.py). The augmentation is drawn in the main process from the run's seeded RNG
(one ``torch.rand`` of fixed width per sample), so a seeded run and a resumed run draw the same crops;
in a data-parallel run each rank draws for the whole global batch and keeps its part (ranks stay on one
RNG stream). A JPEG the device decoder refuses (CMYK, damaged) is decoded again alone, then by PIL.
The decode device is a parameter, so the path runs on a CPU too (tests).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pilot.data.images import JPEG_SIGNATURE, ClassificationData, FileImages
from pilot.data.transforms import ImageTransforms
from pilot.errors import DatasetError
from pilot.runtime import Runtime

log = logging.getLogger(__name__)
BILINEAR = InterpolationMode.BILINEAR  # RandomResizedCrop's interpolation (the CPU path's too)
CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before the central crop (torchvision's value)


@dataclass
class FileBatch:
    """A batch as loader workers hand it over: per file its JPEG bytes (uint8 ``[n]``) or, for other
    formats, its pixels decoded by PIL (uint8 ``[3, H, W]``), packed in one buffer (file ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]`` of shape ``shapes[i]``, ``()`` for bytes), and the paths (for
    error messages). One buffer, not a tensor per file: every tensor that leaves a loader worker takes
    a file descriptor, and hundreds per batch make the loader fail ("Bad file descriptor")."""

    flat: torch.Tensor
    offsets: list[int]
    shapes: list[tuple[int, ...]]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int) -> torch.Tensor:
        data = self.flat[self.offsets[i] : self.offsets[i + 1]]
        return data.view(self.shapes[i]) if self.shapes[i] else data


class FileBytes(Dataset):
    """Reads image files in loader workers: a JPEG's bytes, any other image decoded (PIL, RGB)."""

    def __init__(self, images: FileImages, indices: np.ndarray) -> None:
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Path, int]:
        index = int(self.indices[i])
        path = self.images.paths[index]
        try:
            encoded = Path(path).read_bytes()
            data = np.frombuffer(encoded, dtype=np.uint8)
            if not encoded.startswith(JPEG_SIGNATURE):
                data = pil_decode(encoded).numpy()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DatasetError(f"Cannot read image {path}: {err}. Remove or replace the file.") from None
        return data, path, index


def collate_files(items: list[tuple[np.ndarray, Path, int]]) -> tuple[FileBatch, torch.Tensor]:
    """Loader collation: the files' data packed into one :class:`FileBatch`, the sample ids a tensor."""
    arrays = [data for data, _, _ in items]
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype=np.uint8)
    offsets = np.cumsum([0] + [a.size for a in arrays]).tolist()
    shapes = [tuple(a.shape) if a.ndim == 3 else () for a in arrays]
    batch = FileBatch(torch.from_numpy(flat), offsets, shapes, [path for _, path, _ in items])
    return batch, torch.tensor([index for _, _, index in items], dtype=torch.long)


def pil_decode(encoded: bytes) -> torch.Tensor:
    """Any image PIL reads, as uint8 RGB ``[3, H, W]`` (the CPU path's decoding)."""
    with Image.open(io.BytesIO(encoded)) as img:
        return TF.pil_to_tensor(img.convert("RGB"))


class FileDecoder:
    """Decodes and transforms :class:`FileBatch` es on ``device`` (see the module docstring)."""

    def __init__(self, transforms: ImageTransforms, device: torch.device | str) -> None:
        self.transforms, self.device = transforms, torch.device(device)

    def dataset(self, images: FileImages, indices: np.ndarray) -> FileBytes:
        return FileBytes(images, indices)

    collate = staticmethod(collate_files)

    def prepare(
        self, augment: bool, global_size: int | None = None, part: slice | None = None
    ) -> Callable[[Any], torch.Tensor]:
        """The transform of a :class:`FileBatch`: train (``augment``) or test. In a data-parallel run the
        augmentation is drawn for the ``global_size`` samples of the global batch, this rank's ``part`` kept."""
        if not augment:
            return lambda batch: self.transforms.finish(self.test_images(self.decode(batch)))
        return lambda batch: self.transforms.finish(
            self.train_images(self.decode(batch), draw_augmentation(global_size or len(batch))[part or slice(None)])
        )

    # --------------------------------------------------------------------------------- decoding
    def decode(self, batch: FileBatch) -> list[torch.Tensor]:
        """uint8 ``[3, H, W]`` images on the device: JPEG bytes decoded there in one call, images that
        workers decoded copied there; a JPEG the batched call refuses is decoded alone, then by PIL."""
        out: list[torch.Tensor | None] = [None] * len(batch)
        encoded = [i for i, shape in enumerate(batch.shapes) if not shape]
        if encoded:
            files = [batch.item(i) for i in encoded]
            try:
                decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                decoded = [self._decode_alone(data, batch.paths[i]) for i, data in zip(encoded, files)]
            for i, image in zip(encoded, decoded):
                out[i] = image
        for i, shape in enumerate(batch.shapes):
            if shape:
                out[i] = batch.item(i).to(self.device, non_blocking=True)
        return [image for image in out if image is not None]

    def _decode_alone(self, encoded: torch.Tensor, path: Path) -> torch.Tensor:
        with contextlib.suppress(RuntimeError):  # the device decoder refuses it: PIL below
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        try:
            log.debug("%s: the %s JPEG decoder refused it, decoded by PIL", path, self.device.type)
            return pil_decode(encoded.numpy().tobytes()).to(self.device)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DatasetError(f"Cannot read image {path}: {err}. Remove or replace the file.") from None

    # ------------------------------------------------------------------------------- transforms
    def test_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize(short side, test_interpolation, antialiased) + CenterCrop per image -> uint8 ``[B, 3, S, S]``."""
        t = self.transforms
        size = [t.size, t.size]
        resized = (TF.resize(x, [t.test_resize], interpolation=t.test_interpolation, antialias=True) for x in images)
        return _stack([TF.center_crop(x, size) for x in resized], t.size, self.device)

    def train_images(self, images: list[torch.Tensor], draws: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop (bilinear, antialiased) + horizontal flip per image -> uint8 ``[B, 3, S, S]``;
        ``draws``: one row of :func:`draw_augmentation` per image."""
        t = self.transforms
        heights = torch.tensor([image.shape[-2] for image in images], dtype=torch.float32)
        widths = torch.tensor([image.shape[-1] for image in images], dtype=torch.float32)
        top, left, h, w = crop_boxes(draws[:, :-1], heights, widths, t.train_scale, t.train_ratio)
        flip = (draws[:, -1] < t.hflip_prob).tolist()
        out = []
        for image, box, flipped in zip(images, torch.stack([top, left, h, w], 1).long().tolist(), flip):
            crop = TF.resized_crop(image, *box, [t.size, t.size], interpolation=BILINEAR, antialias=True)
            out.append(TF.horizontal_flip(crop) if flipped else crop)
        return _stack(out, t.size, self.device)


def _stack(images: list[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    return torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device)


def draw_augmentation(n: int, attempts: int = CROP_ATTEMPTS) -> torch.Tensor:
    """``[n, 2 * attempts + 3]`` uniforms from the global torch RNG (CPU): per sample, the crop's area
    fractions and log aspect ratios of every attempt, its top and left offsets, and the flip. A fixed
    number per sample, whatever the image sizes: the RNG stream depends only on the batch size."""
    return torch.rand(n, 2 * attempts + 3)


def crop_boxes(
    draws: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes (torchvision's algorithm, as :func:`pilot.data.transforms.sample_crop_boxes`)
    for images of different sizes, from uniforms ``draws`` ``[n, 2 * attempts + 2]``::

        area fraction a ~ U(scale), log aspect r ~ U(log ratio)      per attempt
        w = round(sqrt(a H W e^r)), h = round(sqrt(a H W / e^r))      the first attempt with 0 < w <= W, 0 < h <= H
        top ~ U{0..H-h}, left ~ U{0..W-w}
        no attempt fits: the central crop of the whole image, aspect ratio clamped to ``ratio``

    Returns float tensors ``top, left, h, w`` ``[n]``."""
    attempts = (draws.shape[1] - 2) // 2
    height, width = heights.unsqueeze(1), widths.unsqueeze(1)
    target = height * width * (scale[0] + draws[:, :attempts] * (scale[1] - scale[0]))
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio[0] + draws[:, attempts : 2 * attempts] * (log_ratio[1] - log_ratio[0]))
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)

    in_ratio = widths / heights
    fallback_w = torch.where(in_ratio > ratio[1], (heights * ratio[1]).round(), widths)
    fallback_h = torch.where(in_ratio < ratio[0], (widths / ratio[0]).round(), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    top = torch.where(found, (draws[:, -2] * (heights - h + 1)).floor(), ((heights - h) / 2).floor())
    left = torch.where(found, (draws[:, -1] * (widths - w + 1)).floor(), ((widths - w) / 2).floor())
    return top, left, h, w


def file_decoder(data: ClassificationData, transforms: ImageTransforms, runtime: Runtime) -> FileDecoder | None:
    """The decoder ``runtime.gpu_decode`` asks for: on the runtime's CUDA device when the dataset is image
    files and the setting is ``on``, or ``auto`` on a CUDA device; None (workers decode with PIL) otherwise."""
    mode = getattr(runtime, "gpu_decode", "off")
    files = isinstance(data.train, FileImages) or isinstance(data.test, FileImages)
    if not files or mode == "off" or not runtime.is_cuda:
        return None
    log.info("image files of %s decoded on %s (runtime.gpu_decode=%s)", data.name, runtime.device, mode)
    return FileDecoder(transforms, runtime.device)
