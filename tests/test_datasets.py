"""Dataset factories: contents, layout rules and the errors that name the offending path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pilot.data import datasets
from pilot.data.datasets import embedded_fashion_mnist, fashion_mnist, image_folder, synthetic
from pilot.data.pipeline import DataPipeline
from pilot.data.scenario import make_scenario
from pilot.data.transforms import ImageTransforms
from pilot.errors import DatasetError
from pilot.runtime import make_runtime


def _write_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_embedded_fashion_mnist_is_a_balanced_uint8_subset():
    data = embedded_fashion_mnist()
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top"
    assert tuple(data.train.images.shape) == (3000, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert tuple(data.test.images.shape) == (1000, 1, 28, 28)
    assert np.bincount(data.train.labels).tolist() == [300] * 10
    assert np.bincount(data.test.labels).tolist() == [100] * 10


def test_fashion_mnist_variants(tmp_path):
    embedded = fashion_mnist(root=str(tmp_path), variant="embedded")
    assert len(embedded.train) == 3000
    # auto with nothing on disk falls back to the embedded subset
    assert len(fashion_mnist(root=str(tmp_path), variant="auto", system_root=str(tmp_path)).train) == 3000
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        fashion_mnist(root=str(tmp_path), variant="full", system_root=str(tmp_path))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_full_fashion_mnist_from_the_debian_package(tmp_path):
    data = fashion_mnist(root=str(tmp_path), variant="auto")
    assert tuple(data.train.images.shape) == (60000, 1, 28, 28) and len(data.test) == 10000
    # the embedded subset is made of real Fashion-MNIST images (its source_index points into the full set)
    with np.load(datasets.EMBEDDED_DIR / "fashion_mnist_subset.npz") as sub:
        idx = sub["train_source_index"][:50]
        np.testing.assert_array_equal(sub["train_images"][:50], data.train.images[idx, 0].numpy())


def test_image_folder_reads_classes_in_alphabetical_order(tmp_path):
    _write_folder(tmp_path, {"train": {"n02": 3, "n01": 2}, "test": {"n01": 1, "n02": 2}})
    data = image_folder(str(tmp_path), name="mine")
    assert data.class_names == ["n01", "n02"]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.test.labels.tolist() == [0, 1, 1]
    assert data.train.paths[0] == tmp_path / "train" / "n01" / "img0.png"


def test_image_folder_batches_decode_to_the_input_size(tmp_path):
    _write_folder(tmp_path, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    data = image_folder(str(tmp_path))
    scenario = make_scenario(2, 1, 1, "natural")
    runtime = make_runtime(device="cpu", num_workers=0, progress=False)
    pipeline = DataPipeline(data, scenario, ImageTransforms(16), runtime)
    batch = next(iter(pipeline.batches("test", range(0, 2), batch_size=4)))
    assert tuple(batch.images.shape) == (4, 3, 16, 16)
    assert batch.labels.tolist() == [0, 0, 1, 1]
    train = next(iter(pipeline.batches("train", range(1, 2), batch_size=8, augment=True, shuffle=True)))
    assert tuple(train.images.shape) == (3, 3, 16, 16) and train.labels.tolist() == [1, 1, 1]


def test_missing_root_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nowhere'} does not exist.*dataset.root"):
        image_folder(str(tmp_path / "nowhere"), how_to_get="Download it from X.")


def test_missing_split_and_empty_class_folder_are_named(tmp_path):
    _write_folder(tmp_path / "a", {"train": {"c1": 1}})
    with pytest.raises(DatasetError, match="test does not exist"):
        image_folder(str(tmp_path / "a"))
    _write_folder(tmp_path / "b", {"train": {"c1": 1}, "test": {"c1": 1}})
    (tmp_path / "b" / "train" / "c2").mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'b' / 'train' / 'c2'} holds no images"):
        image_folder(str(tmp_path / "b"))


def test_unreadable_image_is_named_when_loaded(tmp_path):
    _write_folder(tmp_path, {"train": {"a": 1}, "test": {"a": 1}})
    broken = tmp_path / "test" / "a" / "img0.png"
    broken.write_bytes(b"not a png")
    data = image_folder(str(tmp_path), verify_images="off")  # the load-time check would name it first
    pipeline = DataPipeline(
        data,
        make_scenario(1, 1, 1, "natural"),
        ImageTransforms(8),
        make_runtime(device="cpu", num_workers=0, progress=False),
    )
    with pytest.raises(DatasetError, match=f"Cannot read image {broken}"):
        next(iter(pipeline.batches("test", range(0, 1), batch_size=2))).images


def test_cifar100_missing_without_download(tmp_path):
    with pytest.raises(DatasetError, match=r"CIFAR-100 is not under .*dataset.root"):
        datasets.cifar100(str(tmp_path), download=False)


def test_cifar100_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "host_reachable", lambda url, timeout_s=3.0: False)
    with pytest.raises(DatasetError, match="cannot be reached"):
        datasets.cifar100(str(tmp_path), download=True)


def test_synthetic_is_deterministic_and_class_structured():
    a, b = synthetic(num_classes=3, seed=5), synthetic(num_classes=3, seed=5)
    torch.testing.assert_close(a.train.images, b.train.images)
    assert np.bincount(a.train.labels).tolist() == [16, 16, 16]
    means = torch.stack([a.train.images[torch.from_numpy(a.train.labels == c)].float().mean(0) for c in range(3)])
    assert (means[0] - means[1]).abs().mean() > 20  # classes differ in their colour pattern
