"""Image files decoded on the device (pilot/data/gpu_decode.py), run here with the decode device = CPU.

The path is the one a GPU runs (workers read bytes; the main process decodes a batch with ``decode_jpeg``
and crops/resizes each image on the device); on a CPU ``decode_jpeg`` uses libjpeg-turbo, as PIL does,
so decoding is exact and only the resize kernels differ from the PIL path. The CUDA test at the end
(skipped without a GPU) measures nvJPEG's distance to PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image
from test_registry import assert_resumes_identically, small_overrides
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pilot.data import pipeline as pipeline_module
from pilot.data.datasets import image_folder, synthetic
from pilot.data.gpu_decode import (
    CROP_ATTEMPTS,
    FileBatch,
    FileBytes,
    FileDecoder,
    collate_files,
    crop_boxes,
    draw_augmentation,
    file_decoder,
)
from pilot.data.images import FileImages
from pilot.data.pipeline import DataPipeline, _DecodedFiles
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms, sample_crop_boxes
from pilot.errors import ConfigError, DatasetError
from pilot.runtime import make_runtime

SIZE = 48


def _natural_image(rng: np.random.Generator, height: int, width: int, colour: int | None = None) -> np.ndarray:
    """A smooth random picture plus pixel noise (what JPEG compresses as it does photographs)."""
    coarse = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    if colour is not None:
        coarse[..., colour % 3] = 230
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-15, 16, size=(height, width, 3)), 0, 255).astype(np.uint8)


def write_folder(root: Path, classes: int = 4, train: int = 4, test: int = 2, png_every: int = 0) -> Path:
    """``root/{train,test}/c<k>/`` of JPEGs (every ``png_every``-th file a PNG) of sizes 40-100 px."""
    rng = np.random.default_rng(0)
    count = 0
    for split, per_class in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(40, 101, size=2))
                count += 1
                suffix = "png" if png_every and count % png_every == 0 else "jpg"
                Image.fromarray(_natural_image(rng, h, w, c)).save(folder / f"{i}.{suffix}", quality=90)
    return root


def _images(paths: list[Path]) -> FileImages:
    return FileImages(paths, np.zeros(len(paths), dtype=np.int64))


def _file_batch(images: FileImages) -> FileBatch:
    dataset = FileBytes(images, np.arange(len(images)))
    return collate_files([dataset[i] for i in range(len(images))])[0]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Twelve JPEGs of 60-200 px, two of them greyscale."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(12):
        h, w = (int(v) for v in rng.integers(60, 201, size=2))
        image = Image.fromarray(_natural_image(rng, h, w))
        paths.append(root / f"{i}.jpg")
        (image.convert("L") if i < 2 else image).save(paths[-1], quality=90)
    return paths


# ------------------------------------------------------------------------------------------ crop boxes
def test_crop_boxes_take_the_first_attempt_that_fits():
    a = CROP_ATTEMPTS
    draws = torch.full((1, 2 * a + 2), 0.5)
    draws[0, 0], draws[0, a] = 1.0, 1.0  # attempt 0: the whole area at aspect 2 -> w = 141 > 100: no fit
    draws[0, 1], draws[0, a + 1] = 0.25, 0.5  # attempt 1: area fraction 0.25, aspect 1 -> 50 x 50
    draws[0, -2:] = torch.tensor([0.999, 0.0])
    top, left, h, w = crop_boxes(draws, torch.tensor([100.0]), torch.tensor([100.0]), (0.0, 1.0), (0.5, 2.0))
    assert (h.item(), w.item()) == (50, 50)
    assert (top.item(), left.item()) == (50, 0)  # floor(0.999 * 51), floor(0 * 51)


def test_crop_boxes_fall_back_to_the_central_crop_with_the_ratio_clamped():
    draws = torch.full((2, 2 * CROP_ATTEMPTS + 2), 0.5)
    # scale 1 at aspect 2 never fits a tall 100 x 50 image nor a wide 50 x 200 one
    heights, widths = torch.tensor([100.0, 50.0]), torch.tensor([50.0, 200.0])
    top, left, h, w = crop_boxes(draws, heights, widths, (1.0, 1.0), (2.0, 2.0))
    assert (h[0].item(), w[0].item(), top[0].item(), left[0].item()) == (25, 50, 37, 0)  # 50 / 2 high, centred
    assert (h[1].item(), w[1].item(), top[1].item(), left[1].item()) == (50, 100, 0, 50)  # 50 * 2 wide, centred


def test_crop_boxes_follow_torchvisions_distribution():
    torch.manual_seed(0)
    n, height, width, scale, ratio = 4000, 120.0, 300.0, (0.05, 1.0), (3 / 4, 4 / 3)
    ours = crop_boxes(draw_augmentation(n)[:, :-1], torch.full((n,), height), torch.full((n,), width), scale, ratio)
    reference = sample_crop_boxes(n, int(height), int(width), scale, ratio)
    for mine, theirs in zip(ours, reference):
        assert mine.mean().item() == pytest.approx(theirs.mean().item(), rel=0.05, abs=1.0)
        assert mine.std().item() == pytest.approx(theirs.std().item(), rel=0.08, abs=1.0)
    top, left, h, w = ours
    assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h >= 1)).all())


# ---------------------------------------------------------------------------------- against the PIL path
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_test_transform_is_within_two_grey_levels_of_the_pil_path(jpegs, interpolation):
    transforms = ImageTransforms(SIZE, test_interpolation=interpolation)
    images = _images(jpegs)
    decoder = FileDecoder(transforms, "cpu")
    decoded = decoder.decode(_file_batch(images))
    for image, path in zip(decoded, jpegs):  # libjpeg-turbo on both sides: the same pixels
        assert torch.equal(image, TF.pil_to_tensor(Image.open(path).convert("RGB")))
    ours = decoder.test_images(decoded)
    pil = torch.stack([_DecodedFiles(images, np.arange(len(jpegs)), transforms.test_pil())[i][0] for i in range(12)])
    assert ours.shape == pil.shape == (12, 3, SIZE, SIZE) and ours.dtype == torch.uint8
    difference = (ours.float() - pil.float()).abs()
    assert difference.max().item() <= 2 and difference.mean().item() < 0.05


def test_train_crops_equal_pils_resized_crop_of_the_same_boxes(jpegs):
    transforms = ImageTransforms(SIZE)
    decoder = FileDecoder(transforms, "cpu")
    decoded = decoder.decode(_file_batch(_images(jpegs)))
    torch.manual_seed(3)
    draws = draw_augmentation(len(jpegs))
    ours = decoder.train_images(decoded, draws)
    heights = torch.tensor([float(x.shape[1]) for x in decoded])
    widths = torch.tensor([float(x.shape[2]) for x in decoded])
    boxes = torch.stack(crop_boxes(draws[:, :-1], heights, widths, transforms.train_scale, transforms.train_ratio), 1)
    flips = draws[:, -1] < transforms.hflip_prob
    assert 0 < int(flips.sum()) < len(jpegs)
    for image, path, box, flip in zip(ours, jpegs, boxes.long().tolist(), flips):
        crop = TF.resized_crop(
            Image.open(path).convert("RGB"), *box, [SIZE, SIZE], interpolation=v2.InterpolationMode.BILINEAR
        )
        pil = TF.pil_to_tensor(crop)
        difference = (image.float() - (pil.flip(-1) if flip else pil).float()).abs()
        assert difference.max().item() <= 2 and difference.mean().item() < 0.5


def test_png_files_are_decoded_by_the_workers_and_mixed_into_the_batch(tmp_path, jpegs):
    png = tmp_path / "x.png"
    Image.open(jpegs[5]).save(png)
    images = _images([jpegs[4], png, jpegs[0]])
    batch = _file_batch(images)
    assert [batch.item(i).ndim for i in range(3)] == [1, 3, 1]  # JPEG bytes, decoded PNG pixels, JPEG bytes
    assert batch.item(0).tolist() == list(jpegs[4].read_bytes()) and batch.flat.dtype == torch.uint8
    assert torch.equal(batch.item(1), TF.pil_to_tensor(Image.open(png).convert("RGB")))
    transforms = ImageTransforms(SIZE)
    ours = FileDecoder(transforms, "cpu").prepare(augment=False)(batch)
    pil = torch.stack([_DecodedFiles(images, np.arange(3), transforms.test_pil())[i][0] for i in range(3)])
    assert ours.shape == (3, 3, SIZE, SIZE) and ours.dtype == torch.float32
    assert (ours * 255 - pil.float()).abs().max().item() <= 2.01


def test_a_jpeg_no_decoder_reads_is_named(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG stream")
    decoder = FileDecoder(ImageTransforms(SIZE), "cpu")
    with pytest.raises(DatasetError, match=f"Cannot read image {broken}"):
        decoder.decode(_file_batch(_images([broken])))
    missing = tmp_path / "gone.jpg"
    with pytest.raises(DatasetError, match=f"Cannot read image {missing}"):
        FileBytes(_images([missing]), np.arange(1))[0]


# -------------------------------------------------------------------------------------- randomness
def test_augmentation_draws_a_fixed_amount_of_the_seeded_global_rng(jpegs):
    decoder = FileDecoder(ImageTransforms(SIZE), "cpu")
    batch = _file_batch(_images(jpegs[:5]))
    prepare = decoder.prepare(augment=True)
    torch.manual_seed(7)
    first, after = prepare(batch), torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(prepare(batch), first)
    torch.manual_seed(7)
    torch.rand(5, 2 * CROP_ATTEMPTS + 3)  # what one batch of 5 draws, whatever the image sizes
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(8)
    assert not torch.equal(prepare(batch), first)


def test_a_data_parallel_part_gets_the_images_of_the_global_batch(jpegs):
    decoder = FileDecoder(ImageTransforms(SIZE), "cpu")
    torch.manual_seed(11)
    whole = decoder.prepare(augment=True)(_file_batch(_images(jpegs[:6])))
    torch.manual_seed(11)
    part = decoder.prepare(augment=True, global_size=6, part=slice(2, 4))(_file_batch(_images(jpegs[2:4])))
    assert torch.equal(part, whole[2:4])


# ------------------------------------------------------------------------------- pipeline and switch
def test_the_switch_chooses_the_decoder(tmp_path):
    with pytest.raises(ConfigError, match="runtime.gpu_decode=on .* runtime.device is cpu"):
        make_runtime(device="cpu", gpu_decode="on")
    with pytest.raises(ConfigError, match="runtime.gpu_decode='yes'"):
        make_runtime(device="cpu", gpu_decode="yes")  # type: ignore[arg-type]
    files = image_folder(str(write_folder(tmp_path, classes=2, train=2, test=1)))
    transforms = ImageTransforms(SIZE)
    assert file_decoder(files, transforms, make_runtime(device="cpu", gpu_decode="auto")) is None  # CPU: PIL
    if torch.cuda.is_available():
        cuda = make_runtime(device="cuda", gpu_decode="auto")
        decoder = file_decoder(files, transforms, cuda)
        assert decoder is not None and decoder.device.type == "cuda"
        assert file_decoder(files, transforms, make_runtime(device="cuda", gpu_decode="off")) is None
        assert file_decoder(synthetic(num_classes=2), transforms, cuda) is None  # in memory: nothing to decode


@pytest.mark.parametrize("workers", [0, 1])
def test_pipeline_batches_through_the_decoder_match_the_pil_pipeline(tmp_path, workers):
    data = image_folder(str(write_folder(tmp_path, png_every=5)))
    scenario = make_scenario(4, 2, 2, "natural")
    runtime = make_runtime(device="cpu", num_workers=workers, progress=False, channels_last=True)
    transforms = ImageTransforms(SIZE)
    pil = DataPipeline(data, scenario, transforms, runtime)
    ours = DataPipeline(data, scenario, transforms, runtime)
    assert pil.file_decoder is None
    ours.file_decoder = FileDecoder(transforms, "cpu")
    for a, b in zip(pil.eval_batches("test", range(4), 5), ours.eval_batches("test", range(4), 5)):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert (a.images - b.images).abs().max().item() <= 2 / 255 + 1e-6
    torch.manual_seed(0)
    batches = list(ours.session(scenario.sessions[1]).train_batches(3))
    assert [len(b) for b in batches] == [3, 3, 2] and all(b.labels.min() >= 2 for b in batches)
    assert batches[0].images.shape == (3, 3, SIZE, SIZE) and 0 <= batches[0].images.min() <= 1


def test_a_run_decoding_on_the_device_resumes_identically(tmp_path, monkeypatch):
    """L2P on JPEG files through the decoder (CPU as the decode device): augmentation from the run's RNG."""
    calls = []

    class Counting(FileDecoder):
        def decode(self, batch: FileBatch) -> list[torch.Tensor]:
            calls.append(len(batch))
            return super().decode(batch)

    monkeypatch.setattr(pipeline_module, "file_decoder", lambda data, transforms, runtime: Counting(transforms, "cpu"))
    root = write_folder(tmp_path / "data")
    files = [o for o in FAST if not o.startswith("dataset=")]
    overrides = files + ["dataset=image_folder", f"dataset.root={root}", "scenario=b0inc2", "runtime.num_workers=0"]
    assert_resumes_identically(overrides + small_overrides("l2p"), tmp_path / "runs")
    assert sum(calls) > 0


# ------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_images_are_close_to_the_pil_path(jpegs, capsys):
    transforms = ImageTransforms(SIZE)
    images = _images(jpegs)
    ours = FileDecoder(transforms, "cuda").test_images(FileDecoder(transforms, "cuda").decode(_file_batch(images)))
    pil = torch.stack([_DecodedFiles(images, np.arange(len(jpegs)), transforms.test_pil())[i][0] for i in range(12)])
    difference = (ours.cpu().float() - pil.float()).abs()
    with capsys.disabled():
        print(f"\nnvJPEG + GPU resize vs PIL: max {difference.max():.0f}, mean {difference.mean():.3f} grey levels")
    assert ours.device.type == "cuda" and difference.mean().item() < 2.0
    torch.manual_seed(0)
    train = FileDecoder(transforms, "cuda").prepare(augment=True)(_file_batch(images))
    assert train.shape == (12, 3, SIZE, SIZE) and train.device.type == "cuda"
