"""The two ways a dataset split holds its images: in memory as uint8 arrays, or as files on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
