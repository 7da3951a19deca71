"""The two ways a dataset split holds its images: in memory as uint8 arrays, or as files on disk.

Also the checks every dataset passes before a run starts: each class has training and test images
(:meth:`ClassificationData.check_classes`), and image files open as images (:func:`verify_files`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pilot.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

VERIFY_MODES: tuple[str, ...] = ("fast", "full", "off")
RANDOM_DECODES = 16  # fast mode: files of each split fully decoded besides the first of every class
VERIFY_THREADS = 4  # threads that check files (helps most where reads wait on a network file system)
TAIL_BYTES = 1024  # how much of a file's end is read to see that it is complete
MAX_LISTED = 10  # unreadable files named in one message
JPEG_SIGNATURE, PNG_SIGNATURE = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


@dataclass
class ArrayImages:
    """Images held in memory as a uint8 tensor ``[N, C, H, W]`` (C = 1 or 3) with integer labels.

    CIFAR-100, Fashion-MNIST and the synthetic test data live this way; batches are cut from the
    tensor and transformed on the compute device, with no loader workers.
    """

    images: torch.Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ArrayImages needs a uint8 [N, C, H, W] tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FileImages:
    """Images stored as files (one path per sample), decoded by loader workers."""

    paths: list[Path]
    labels: np.ndarray
    root: Path = field(default=Path("."))

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)


ImageSet = ArrayImages | FileImages


@dataclass
class ClassificationData:
    """A dataset's train and test splits and its class names (label ``i`` is ``class_names[i]``)."""

    name: str
    class_names: list[str]
    train: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        self.check_classes()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_classes(self) -> None:
        """Refuse labels outside ``0..num_classes-1`` and classes without training or test images
        (such a class would stop the run only when its session comes, or be scored on nothing)."""
        if not self.class_names:
            raise DatasetError(f"Dataset {self.name} has no classes.")
        counts = {split: self._class_counts(split) for split in ("train", "test")}
        empty = [(c, split) for split in ("train", "test") for c in range(self.num_classes) if counts[split][c] == 0]
        if empty:
            listed = ", ".join(f"{self.class_names[c]!r} (label {c}) has no {split} images" for c, split in empty[:5])
            raise DatasetError(
                f"Dataset {self.name}: {listed}{' ...' if len(empty) > 5 else ''}. Every class needs training and "
                f"test images ({len(empty)} class/split pair(s) are empty); add images or remove the class."
            )

    def _class_counts(self, split: str) -> np.ndarray:
        labels = getattr(self, split).labels
        outside = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(outside):
            raise DatasetError(
                f"Dataset {self.name}: {split} labels {sorted(set(outside.tolist()))[:5]} are outside "
                f"0..{self.num_classes - 1} ({self.num_classes} class names)."
            )
        return np.bincount(labels, minlength=self.num_classes)


# ------------------------------------------------------------------------------ image file checks
def check_image_file(path: Path, decode: bool = False, reduced: bool = False) -> str | None:
    """Why the file ``path`` cannot be used as an image, or None when it can.

    Without ``decode`` the check is cheap: a JPEG or PNG passes when it starts with its signature and
    its last bytes hold the end marker (a JPEG's end-of-image marker, a PNG's IEND chunk), which a
    truncated file lacks; any other file must have a header PIL can parse. A JPEG or PNG whose end
    looks wrong is decoded to be sure, so a file PIL can decode is never refused. With ``decode`` the
    whole file is decoded as the loader does; ``reduced`` decodes JPEGs at 1/8 scale, which still
    reads every coded byte (a truncated or damaged stream still fails) at a fraction of the cost.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            if not head:
                return "the file is empty"
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
            signed = _signed_format(head)
            if not decode and signed is not None and END_MARKERS[signed] in tail:
                return None
            f.seek(0)
            with Image.open(f) as img:
                if decode or signed is not None:
                    if reduced:
                        img.draft("RGB", (1, 1))
                    img.load()
    except Image.UnidentifiedImageError:
        return "not an image file that PIL can identify"
    except Exception as err:  # noqa: BLE001 - whatever PIL raises here, the loader would raise too
        return f"{type(err).__name__}: {err}"
    return None


def _signed_format(head: bytes) -> str | None:
    """``JPEG`` or ``PNG`` when the file starts with that format's signature."""
    if head.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    return None


def files_to_decode(images: FileImages, extra: int = RANDOM_DECODES, seed: int = 0) -> set[int]:
    """Indices of the first file of every class plus ``extra`` files drawn at random (seeded)."""
    _, first = np.unique(images.labels, return_index=True)
    chosen = {int(i) for i in first}
    rest = [i for i in range(len(images)) if i not in chosen]
    chosen.update(random.Random(seed).sample(rest, min(extra, len(rest))))
    return chosen


def verify_files(data: ClassificationData, mode: str) -> None:
    """Check that the image files of ``data`` can be read before any training (``dataset.verify_images``).

    ``fast`` (default): the header and ending of every file (:func:`check_image_file`) and a full
    decode of the first file of every class and a few random ones in each split; ``full``: every file
    decoded as the loader will; ``off``: no check (files are then only read when their session comes).
    Raises :class:`DatasetError` naming the unreadable files.
    """
    if mode not in VERIFY_MODES:
        raise ConfigError(f"dataset.verify_images={mode!r} is not one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        return
    jobs: list[tuple[Path, bool]] = []
    for images in (data.train, data.test):
        if isinstance(images, FileImages):
            decode = set(range(len(images))) if mode == "full" else files_to_decode(images)
            jobs += [(path, i in decode) for i, path in enumerate(images.paths)]
    if not jobs:
        return
    start = time.perf_counter()
    bad = _check_in_threads(jobs, reduced=mode == "fast")
    decoded = sum(decode for _, decode in jobs)
    log.info(
        "dataset %s: %d image files checked (%s, %d decoded) in %.1fs",
        data.name,
        len(jobs),
        mode,
        decoded,
        time.perf_counter() - start,
    )
    if bad:
        raise DatasetError(_unreadable_message(data.name, bad, len(jobs), mode))


def _check_in_threads(jobs: Sequence[tuple[Path, bool]], reduced: bool) -> list[tuple[Path, str]]:
    """Run :func:`check_image_file` over ``(path, decode)`` jobs in a few threads (file reads and
    decoding release the GIL; on a network file system the reads dominate), one chunk per thread."""

    def check(chunk: Sequence[tuple[Path, bool]]) -> list[tuple[Path, str]]:
        found = ((path, check_image_file(path, decode, reduced)) for path, decode in chunk)
        return [(path, why) for path, why in found if why is not None]

    workers = min(VERIFY_THREADS, len(jobs))
    chunks = [jobs[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = [item for part in pool.map(check, chunks) for item in part]
    order = {path: i for i, (path, _) in enumerate(jobs)}
    return sorted(found, key=lambda item: order[item[0]])


def _unreadable_message(name: str, bad: Sequence[tuple[Path, str]], total: int, mode: str) -> str:
    lines = "".join(f"\n  {path}: {why}" for path, why in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    hint = " dataset.verify_images=full decodes every file to find all damaged ones." if mode == "fast" else ""
    return (
        f"Dataset {name}: {len(bad)} of {total} image files cannot be read:{lines}{more}\n"
        f"Remove or replace these files (the run would otherwise stop when their session comes).{hint}"
    )
