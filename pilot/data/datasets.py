"""Dataset factories. Each returns a :class:`ClassificationData`; configs in ``configs/dataset/``
name them with ``_target_``.

Every factory checks its files before returning and raises :class:`DatasetError` naming the path
that is missing or wrong and saying how to provide it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from pilot.data.images import VERIFY_MODES, ArrayImages, ClassificationData, FileImages, verify_files
from pilot.errors import ConfigError, DatasetError
from pilot.network import host_reachable
from pilot.schema import ClassCount, NonEmptyStr, NonNegativeFloat, PositiveInt, Seed

EMBEDDED_DIR = Path(__file__).parent / "embedded"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------- CIFAR-100
def cifar100(root: NonEmptyStr, download: bool = True) -> ClassificationData:
    """CIFAR-100 through torchvision (50,000 / 10,000 images of 32x32, 100 classes)."""
    from torchvision.datasets import CIFAR100

    root_path = Path(root).expanduser()
    if not (root_path / CIFAR100.base_folder).is_dir():
        if not download:
            raise DatasetError(
                f"CIFAR-100 is not under {root_path} (expected the folder {root_path / CIFAR100.base_folder}). "
                "Set dataset.root=<folder that holds cifar-100-python> or allow dataset.download=true."
            )
        if not host_reachable(CIFAR100.url, timeout_s=5):
            raise DatasetError(
                f"CIFAR-100 is not under {root_path} and {CIFAR100.url} cannot be reached to download it. "
                "Download cifar-100-python.tar.gz on a machine with network, unpack it into a folder, "
                "and pass dataset.root=<that folder>."
            )
    splits = {}
    for split, is_train in (("train", True), ("test", False)):
        try:
            ds = CIFAR100(root=str(root_path), train=is_train, download=download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise DatasetError(f"CIFAR-100 under {root_path} cannot be read: {err}") from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = ArrayImages(images, np.asarray(ds.targets))
    return ClassificationData("cifar100", list(ds.classes), splits["train"], splits["test"])


# ----------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist(folders: list[Path]) -> Path | None:
    """The first folder holding the four Fashion-MNIST IDX files (plain or .gz), if any."""
    for folder in folders:
        for candidate in (folder, folder / "FashionMNIST" / "raw"):
            names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
            if all((candidate / n).exists() or (candidate / f"{n}.gz").exists() for n in names):
                return candidate
    return None


def _idx_path(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).exists() else folder / f"{name}.gz"


def fashion_mnist(
    root: NonEmptyStr,
    variant: Literal["auto", "embedded", "full"] = "auto",
    system_root: str = "/usr/share/datasets/fashion-mnist",
    download: bool = False,
) -> ClassificationData:
    """Fashion-MNIST (10 classes, 28x28 grey).

    ``variant``: ``embedded`` = the class-balanced subset shipped inside the package (works on any
    machine); ``full`` = the 60,000 / 10,000 set from ``root``, Debian's ``dataset-fashion-mnist``
    package (``system_root``) or a torchvision download; ``auto`` = full when found, else embedded.
    """
    if variant not in ("auto", "embedded", "full"):
        raise DatasetError(f"dataset.variant={variant!r} is not one of auto, embedded, full")
    if variant in ("auto", "full"):
        folder = find_fashion_mnist([Path(root).expanduser(), Path(system_root)])
        if folder is None and variant == "full" and download:
            folder = _download_fashion_mnist(Path(root).expanduser())
        if folder is not None:
            splits = {
                split: ArrayImages(
                    torch.from_numpy(read_idx(_idx_path(folder, img)).copy()).unsqueeze(1),
                    read_idx(_idx_path(folder, lab)).astype(np.int64),
                )
                for split, (img, lab) in FASHION_MNIST_FILES.items()
            }
            return ClassificationData("fashion_mnist", FASHION_MNIST_CLASSES, splits["train"], splits["test"])
        if variant == "full":
            raise DatasetError(
                f"The full Fashion-MNIST set is neither under {root} nor under {system_root}. Install "
                "Debian's package (apt-get install dataset-fashion-mnist), put the four IDX files into "
                "dataset.root, set dataset.download=true on a machine with network, or use "
                "dataset.variant=embedded for the subset shipped with pilot."
            )
    return embedded_fashion_mnist()


def embedded_fashion_mnist() -> ClassificationData:
    """The class-balanced Fashion-MNIST subset shipped in ``pilot/data/embedded`` (see its NOTICE)."""
    path = EMBEDDED_DIR / "fashion_mnist_subset.npz"
    if not path.exists():
        raise DatasetError(
            f"The embedded Fashion-MNIST subset {path} is missing; reinstall pilot or run "
            "scripts/build_fashion_mnist_subset.py"
        )
    with np.load(path) as arrays:
        train = ArrayImages(torch.from_numpy(arrays["train_images"]).unsqueeze(1), arrays["train_labels"])
        test = ArrayImages(torch.from_numpy(arrays["test_images"]).unsqueeze(1), arrays["test_labels"])
    return ClassificationData("fashion_mnist", FASHION_MNIST_CLASSES, train, test)


def _download_fashion_mnist(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    if not host_reachable(FashionMNIST.mirrors[0], timeout_s=5):
        raise DatasetError(
            f"Fashion-MNIST is not under {root} and {FashionMNIST.mirrors[0]} cannot be reached to download it. "
            "Use dataset.variant=embedded, or install Debian's dataset-fashion-mnist package."
        )
    FashionMNIST(root=str(root), train=True, download=True)
    return root / "FashionMNIST" / "raw"


# ---------------------------------------------------------------------------------- image folders
def _list_class_folders(split_dir: Path) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = sorted(
            Path(f.path) for f in os.scandir(entry.path) if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS)
        )
        classes[entry.name] = files
    return classes


def image_folder(
    root: NonEmptyStr,
    name: NonEmptyStr = "image_folder",
    how_to_get: str = "",
    verify_images: Literal["fast", "full", "off"] = "fast",
) -> ClassificationData:
    """A dataset laid out as ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``.

    Class labels follow the alphabetical order of the class folder names (torchvision's
    ``ImageFolder`` convention, which the reference toolbox's ImageNet-R class order relies on).
    Every class folder of train/ needs a non-empty folder of the same name in test/ and the other
    way round. ``verify_images`` (``fast``, ``full`` or ``off``) says how thoroughly the image files
    are checked before the run starts (:func:`pilot.data.images.verify_files`).
    """
    root_path = Path(root).expanduser()
    hint = f" {how_to_get}" if how_to_get else ""
    if not root_path.is_dir():
        raise DatasetError(
            f"Dataset root {root_path} does not exist. Set dataset.root=<folder with train/ and test/>.{hint}"
        )
    if verify_images not in VERIFY_MODES:
        raise ConfigError(f"dataset.verify_images={verify_images!r} is not one of {', '.join(VERIFY_MODES)}")
    splits: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        split_dir = root_path / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"{split_dir} does not exist: an image-folder dataset needs {root_path}/train/<class>/ and "
                f"{root_path}/test/<class>/.{hint}"
            )
        splits[split] = _list_class_folders(split_dir)
        if not splits[split]:
            raise DatasetError(f"{split_dir} holds no class folders.{hint}")
        _refuse_empty_class_folders(split_dir, splits[split])
    class_names = sorted(splits["train"])
    _refuse_unmatched_classes(root_path, set(splits["train"]), set(splits["test"]))
    label_of = {c: i for i, c in enumerate(class_names)}

    def files_of(split: str) -> FileImages:
        paths = [p for c in class_names for p in splits[split][c]]
        labels = [label_of[c] for c in class_names for _ in splits[split][c]]
        return FileImages(paths, np.asarray(labels), root_path / split)

    data = ClassificationData(name, class_names, files_of("train"), files_of("test"))
    verify_files(data, verify_images)
    return data


def _refuse_empty_class_folders(split_dir: Path, classes: dict[str, list[Path]]) -> None:
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DatasetError(
            f"Class folder {split_dir / empty[0]} holds no images (extensions {', '.join(IMG_EXTENSIONS)}); "
            f"{len(empty)} class folder(s) are empty in {split_dir}: {empty[:5]}. Add images or remove the "
            "class from both train/ and test/."
        )


def _refuse_unmatched_classes(root: Path, train: set[str], test: set[str]) -> None:
    """train/ and test/ must hold the same class folders: a class without test images could not be
    scored, test images of a class never trained could not be predicted."""
    no_test = sorted(train - test)
    if no_test:
        raise DatasetError(
            f"Class {no_test[0]!r} has training images in {root / 'train' / no_test[0]} but no test folder "
            f"{root / 'test' / no_test[0]}; {len(no_test)} class(es) of train/ are missing from test/: "
            f"{no_test[:5]}. Add their test images or remove them from train/."
        )
    unknown = sorted(test - train)
    if unknown:
        raise DatasetError(
            f"{root / 'test'} has class folders missing from train/: {unknown[:5]} ({len(unknown)} in all); "
            f"e.g. {root / 'train' / unknown[0]} does not exist. Add their training images or remove them from test/."
        )


# ------------------------------------------------------------------------------------- synthetic
def synthetic(
    num_classes: ClassCount = 10,
    train_per_class: PositiveInt = 16,
    test_per_class: PositiveInt = 8,
    image_size: PositiveInt = 32,
    noise: NonNegativeFloat = 40.0,
    seed: Seed = 0,
) -> ClassificationData:
    """Class-conditional random images for tests: each class is a fixed coarse colour pattern
    (a 4x4 grid upsampled to ``image_size``) plus per-sample Gaussian pixel noise.

    Classes are separable, so a learner that works scores above chance even with a random backbone.
    """
    _require_positive(
        num_classes=num_classes, train_per_class=train_per_class, test_per_class=test_per_class, image_size=image_size
    )
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 4, 4, generator=gen) * 255
    patterns = torch.nn.functional.interpolate(patterns, size=image_size, mode="nearest")

    def make(per_class: int) -> ArrayImages:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        pixels = patterns[labels] + noise * torch.randn(len(labels), 3, image_size, image_size, generator=gen)
        return ArrayImages(pixels.clamp(0, 255).round().to(torch.uint8), labels.numpy())

    train, test = make(train_per_class), make(test_per_class)
    return ClassificationData("synthetic", [f"class_{i:03d}" for i in range(num_classes)], train, test)


def _require_positive(**values: int) -> None:
    """Refuse a size or count below 1 in the dataset config, naming the key."""
    for key, value in values.items():
        if int(value) < 1:
            why = " (every class needs training and test images)" if key.endswith("per_class") else ""
            raise ConfigError(f"dataset.{key}={value} must be >= 1{why}; set dataset.{key}=<a positive number>.")
