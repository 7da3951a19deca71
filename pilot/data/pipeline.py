"""Batches for a session: the samples of a label range, class-sorted or shuffled, transformed.

In-memory datasets are indexed directly (moved to the device once when ``runtime.data_on_device``)
and transformed in whole batches on the device; image files are decoded and cropped by loader
workers into uint8 tensors (pinned, persistent workers) and finished on the device, or, with
``runtime.gpu_decode``, only read by the workers and decoded and cropped on the device
(:mod:`pilot.data.gpu_decode`).

Three splits: ``train`` (what learners train and compute prototypes on), ``val`` (the training images
held out by ``scenario.val_fraction``, never shown to a learner's training or prototype passes) and
``test``. ``val`` shares the training images' storage and sample ids; only its membership differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from pilot import distributed
from pilot.data.gpu_decode import file_decoder
from pilot.data.images import ArrayImages, ClassificationData, FileImages
from pilot.data.scenario import Scenario, SessionInfo
from pilot.data.transforms import ImageTransforms
from pilot.errors import DatasetError
from pilot.runtime import Runtime

log = logging.getLogger(__name__)
TRAIN, VAL, TEST = "train", "val", "test"
_STORAGE = {TRAIN: TRAIN, VAL: TRAIN, TEST: TEST}  # the split whose images and labels a split reads
_SHUFFLE_STREAM = 0x7E57  # seeds the shuffled evaluation order apart from the validation draw


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which samples (``True``) to hold out for validation: ``round(fraction * n_c)`` of each class's
    ``n_c`` images, at least one and never all of them; none when ``fraction`` is 0.

    Each class draws with its own generator, seeded by ``(seed, class id)``, so a class's held-out
    images do not depend on the other classes, on the class order, or on the global RNGs."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return mask
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    for c, start, n in zip(classes.tolist(), starts.tolist(), counts.tolist()):
        if n < 2:
            raise DatasetError(
                f"scenario.val_fraction={fraction}: class {c} has {n} training image, so none can be held out "
                "for validation without leaving the class untrained. Use scenario.val_fraction=0 or add images."
            )
        n_val = min(max(1, math.floor(fraction * n + 0.5)), n - 1)
        rng = np.random.default_rng([int(seed), int(c)])
        mask[rng.choice(order[start : start + n], size=n_val, replace=False)] = True
    return mask


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without blocking the host (through pinned memory on CUDA)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Batch:
    """One batch: device images (transformed on first access), remapped labels and sample ids.

    ``ids`` are indices into the split (``split``, which holds ``split_size`` samples), stable
    across sessions, so that outputs of a frozen network on deterministic inputs
    (``augmented=False``) can be cached by id. In a data-parallel run a batch is this rank's part of
    a global batch of ``global_size`` samples (it may be empty in evaluation and feature passes).
    """

    def __init__(
        self,
        raw: torch.Tensor,
        prepare: Callable[[torch.Tensor], torch.Tensor],
        labels: torch.Tensor,
        ids: torch.Tensor,
        split: str,
        augmented: bool,
        split_size: int,
        global_size: int | None = None,
    ) -> None:
        self._raw: Any = raw  # dropped (None) once prepared
        self._prepare = prepare
        self._images: torch.Tensor | None = None
        self.labels, self.ids, self.split, self.augmented = labels, ids, split, augmented
        self.split_size = split_size
        # Data-parallel runs (pilot.distributed): the size of the global batch this rank holds a part of.
        self.global_size = len(labels) if global_size is None else int(global_size)

    @property
    def share(self) -> float:
        """This part's share of its global batch (1 in a one-process run)."""
        return len(self.labels) / self.global_size if self.global_size else 0.0

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._prepare(self._raw)
            self._raw = None
        return self._images

    def __len__(self) -> int:
        return len(self.labels)


class _DecodedFiles(Dataset):
    """Decodes and crops image files in loader workers; returns uint8 ``[3, S, S]`` and the index."""

    def __init__(self, images: FileImages, indices: np.ndarray, transform: Callable) -> None:
        self.images, self.indices, self.transform = images, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        path = self.images.paths[index]
        try:
            with Image.open(path) as img:
                pixels = self.transform(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DatasetError(f"Cannot read image {path}: {err}. Remove or replace the file.") from None
        return pixels, index


class BatchStream:
    """An iterable of :class:`Batch` over fixed sample indices; each iteration is one epoch."""

    def __init__(
        self,
        pipeline: DataPipeline,
        split: str,
        indices: np.ndarray,
        batch_size: int,
        augment: bool,
        shuffle: bool,
        drop_last: bool,
        unit: int = 1,
    ) -> None:
        self.pipeline, self.split, self.indices = pipeline, split, indices
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.unit = unit  # data-parallel runs cut a global batch only at multiples of this (vote groups)
        self._loader: DataLoader | None = None
        self._plan: _RankBatches | None = None

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        images = self.pipeline.images(self.split)
        if isinstance(images, ArrayImages):
            yield from self._iter_arrays()
        elif distributed.active():
            yield from self._iter_files_sharded(images)
        else:
            yield from self._iter_files(images)

    def _skip(self, n: int) -> bool:
        """Whether a global batch of ``n`` samples is left out: a partial one with ``drop_last``, and in a
        data-parallel run a *training* batch (shuffled stream) with fewer samples than ranks, which would
        leave a rank without data for a step that every rank must take."""
        if self.drop_last and n < self.batch_size:
            return True
        return self.shuffle and distributed.active() and n < distributed.world_size()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return self.indices[torch.randperm(len(self.indices)).numpy()]

    def _iter_arrays(self) -> Iterator[Batch]:
        p = self.pipeline
        stored = p.device_arrays(self.split)
        labels = p.device_labels(self.split)
        prepare = p.transforms.train_batch if self.augment else p.transforms.test_batch
        # One copy of the epoch's sample order to the device; batches are slices of it, so no step
        # waits on a host-to-device copy.
        order = to_device(torch.from_numpy(self._order()), p.runtime.device)
        for ids in order.split(self.batch_size):
            if self._skip(len(ids)):
                continue
            part = distributed.shard(len(ids), self.unit)
            # Augmentation is drawn for the whole global batch (the RNG stream every rank shares), then
            # cut: each rank gets exactly the images a one-process run would give its samples.
            transform = _part_of(prepare, part) if self.augment and distributed.active() else prepare
            mine = ids if self.augment else ids[part]
            if stored.device == mine.device:
                raw = stored[mine]
            else:  # images kept in host memory: gather there, copy pinned
                raw = to_device(stored[mine.cpu()], p.runtime.device)
            local = ids[part]
            yield Batch(raw, p.finish(transform), labels[local], local, self.split, self.augment, len(labels), len(ids))

    def _file_loader(self, images: FileImages, indices: np.ndarray, **sampling: Any) -> DataLoader:
        """Loader workers over ``images[indices]``: they decode and crop with PIL, or only read the files
        (``pipeline.file_decoder``). ``sampling``: ``batch_size``/``shuffle``/``drop_last``, or ``batch_sampler``."""
        p = self.pipeline
        decoder, workers = p.file_decoder, p.runtime.num_workers
        if decoder is not None:
            dataset: Dataset = decoder.dataset(images, indices)
        else:
            dataset = _DecodedFiles(
                images, indices, p.transforms.train_pil() if self.augment else p.transforms.test_pil()
            )
        return DataLoader(
            dataset,
            collate_fn=decoder.collate if decoder is not None else None,
            num_workers=workers,
            pin_memory=p.runtime.is_cuda,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            **sampling,
        )

    def _iter_files(self, images: FileImages) -> Iterator[Batch]:
        p = self.pipeline
        decoder = p.file_decoder
        if self._loader is None:
            self._loader = self._file_loader(
                images, self.indices, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last
            )
        labels = p.device_labels(self.split)
        prepare = p.finish(decoder.prepare(self.augment) if decoder is not None else p.transforms.finish)
        for pixels, ids in self._loader:
            if decoder is None:  # else a FileBatch of bytes, decoded on the device by ``prepare``
                pixels = pixels.to(p.runtime.device, non_blocking=True)
            ids = ids.to(p.runtime.device, non_blocking=True)
            yield Batch(pixels, prepare, labels[ids], ids, self.split, self.augment, len(labels))

    def _iter_files_sharded(self, images: FileImages) -> Iterator[Batch]:
        """Image files in a data-parallel run: every rank plans the epoch's global batches from the shared
        RNG stream and decodes only its part of each. Augmentations (drawn in loader workers) are not
        the ones a one-process run draws for the same samples, only drawn the same way; the device
        decoder draws them for the whole global batch from the shared stream and keeps the rank's part."""
        p = self.pipeline
        decoder = p.file_decoder
        if self._loader is None:
            self._plan = _RankBatches()
            self._loader = self._file_loader(images, np.arange(len(images.paths)), batch_sampler=self._plan)
        assert self._plan is not None
        order = self._order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [b for b in batches if not self._skip(len(b))]
        parts = [b[distributed.shard(len(b), self.unit)] for b in batches]
        self._plan.batches = [part.tolist() for part in parts if len(part)]
        labels = p.device_labels(self.split)
        loaded: Iterator[tuple[Any, torch.Tensor]] = iter(self._loader) if self._plan.batches else iter(())
        for batch, part in zip(batches, parts):
            prepare: Callable[[Any], torch.Tensor] = p.transforms.finish
            if len(part) == 0:
                ids = torch.zeros(0, dtype=torch.long, device=p.runtime.device)
                size = p.transforms.size
                pixels = torch.zeros(0, 3, size, size, dtype=torch.uint8, device=p.runtime.device)
            else:
                pixels, ids = next(loaded)
                if decoder is None:
                    pixels = pixels.to(p.runtime.device, non_blocking=True)
                else:  # augmentation drawn for the global batch, this rank's part kept
                    prepare = decoder.prepare(self.augment, len(batch), distributed.shard(len(batch), self.unit))
                ids = ids.to(p.runtime.device, non_blocking=True)
            yield Batch(
                pixels,
                p.finish(prepare),
                labels[ids],
                ids,
                self.split,
                self.augment,
                len(labels),
                len(batch),
            )


class _RankBatches:
    """Batch sampler of a data-parallel file stream: this rank's parts of the epoch's planned batches
    (sample indices into the split's files), set by :meth:`BatchStream._iter_files_sharded`."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def _part_of(prepare: Callable[[torch.Tensor], torch.Tensor], part: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    """``prepare`` applied to a whole global batch, then cut to this rank's ``part``."""
    return lambda raw: prepare(raw)[part]


@dataclass
class SessionData:
    """A session as a learner sees it: its :class:`SessionInfo` and access to its training data."""

    info: SessionInfo
    pipeline: DataPipeline

    def train_batches(
        self, batch_size: int, augment: bool = True, shuffle: bool = True, drop_last: bool = False
    ) -> BatchStream:
        """Training images of the session's new classes (train transform by default). In a data-parallel
        run ``batch_size`` is the global batch (times the number of ranks with ``runtime.scale_batch``)."""
        if self.pipeline.runtime.scale_batch:
            batch_size *= distributed.world_size()
        return self.pipeline.batches(TRAIN, self.info.new_classes, batch_size, augment, shuffle, drop_last)

    def replay_batches(self, batch_size: int, memory_ids: np.ndarray) -> BatchStream:
        """:meth:`train_batches` (train transform, shuffled) over the new classes' training images followed
        by the training-split samples ``memory_ids`` (an exemplar memory)."""
        if self.pipeline.runtime.scale_batch:
            batch_size *= distributed.world_size()
        ids = np.concatenate([self.pipeline.indices(TRAIN, self.info.new_classes), np.asarray(memory_ids, np.int64)])
        return BatchStream(self.pipeline, TRAIN, ids, batch_size, augment=True, shuffle=True, drop_last=False)

    def sample_batches(self, ids: np.ndarray, batch_size: int) -> BatchStream:
        """Training-split samples ``ids`` in that order, with the test transform (feature passes)."""
        ids = np.asarray(ids, dtype=np.int64)
        return BatchStream(self.pipeline, TRAIN, ids, batch_size, augment=False, shuffle=False, drop_last=False)

    def prototype_batches(self, batch_size: int) -> BatchStream:
        """Training images of the new classes with the test transform, class-sorted (prototype passes)."""
        return self.pipeline.batches(TRAIN, self.info.new_classes, batch_size, augment=False, shuffle=False)


class DataPipeline:
    """Everything that turns a dataset and a scenario into device batches.

    ``seed`` (the run seed) draws the validation hold-out (``scenario.val_fraction``) and the order of
    evaluation samples when ``scenario.shuffle_test`` is on; neither touches the global RNGs."""

    def __init__(
        self,
        data: ClassificationData,
        scenario: Scenario,
        transforms: ImageTransforms,
        runtime: Runtime,
        seed: int = 0,
    ) -> None:
        self.data, self.scenario, self.transforms, self.runtime = data, scenario, transforms, runtime
        self.seed = int(seed)
        self.file_decoder = file_decoder(data, transforms, runtime)  # None: loader workers decode (PIL)
        train_labels = scenario.remap(data.train.labels)
        self._labels = {TRAIN: train_labels, VAL: train_labels, TEST: scenario.remap(data.test.labels)}
        held_out = holdout_mask(data.train.labels, scenario.val_fraction, self.seed)
        members = {
            TRAIN: np.flatnonzero(~held_out),
            VAL: np.flatnonzero(held_out),
            TEST: np.arange(len(self._labels[TEST])),
        }
        # Stable sort by remapped label: samples of class 0, then class 1, ... (the reference order).
        self._sorted = {s: ids[np.argsort(self._labels[s][ids], kind="stable")] for s, ids in members.items()}
        self._bounds = {
            s: np.searchsorted(self._labels[s][ids], np.arange(scenario.num_classes + 1))
            for s, ids in self._sorted.items()
        }
        self._eval_rank: dict[str, np.ndarray] = {}
        self._device_arrays: dict[str, torch.Tensor] = {}
        self._device_labels: dict[str, torch.Tensor] = {}
        if self.has_validation:
            log.info(
                "validation: %d of %d training images held out (scenario.val_fraction=%g per class, seed %d)",
                len(members[VAL]),
                len(train_labels),
                scenario.val_fraction,
                self.seed,
            )

    @property
    def has_validation(self) -> bool:
        """Whether ``scenario.val_fraction`` holds out a validation set."""
        return len(self._sorted[VAL]) > 0

    def images(self, split: str) -> ArrayImages | FileImages:
        return self.data.train if _STORAGE[split] == TRAIN else self.data.test

    def labels(self, split: str) -> np.ndarray:
        """Remapped labels of every sample of ``split`` (indexed by sample id)."""
        return self._labels[split]

    def indices(self, split: str, classes: range) -> np.ndarray:
        """Sample ids of ``split`` whose label is in ``classes``, class-sorted."""
        bounds = self._bounds[split]
        return self._sorted[split][bounds[classes.start] : bounds[classes.stop]]

    def eval_batches(self, split: str, classes: range, batch_size: int, unit: int = 1) -> BatchStream:
        """Evaluation batches (test transform) of ``split`` over ``classes``: class-sorted as the
        reference evaluates, or, with ``scenario.shuffle_test``, in a seeded random order that is fixed
        for the run (after every session the seen classes' samples come in the same relative order)."""
        indices = self.indices(split, classes)
        if self.scenario.shuffle_test:
            if split not in self._eval_rank:
                rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, list(_STORAGE).index(split)])
                self._eval_rank[split] = rng.permutation(len(self._labels[split]))
            indices = indices[np.argsort(self._eval_rank[split][indices], kind="stable")]
        return BatchStream(self, split, indices, batch_size, augment=False, shuffle=False, drop_last=False, unit=unit)

    def batches(
        self,
        split: str,
        classes: range,
        batch_size: int,
        augment: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> BatchStream:
        return BatchStream(self, split, self.indices(split, classes), batch_size, augment, shuffle, drop_last)

    def session(self, info: SessionInfo) -> SessionData:
        return SessionData(info, self)

    def finish(self, prepare: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Wrap a transform so its output has the runtime's memory format."""
        if not self.runtime.channels_last:
            return prepare
        return lambda raw: prepare(raw).contiguous(memory_format=torch.channels_last)

    def device_arrays(self, split: str) -> torch.Tensor:
        """The split's uint8 images, on the device when ``runtime.data_on_device`` (moved once)."""
        split = _STORAGE[split]
        if split not in self._device_arrays:
            data = self.images(split)
            if not isinstance(data, ArrayImages):
                raise TypeError(f"device_arrays needs in-memory images, the {split} split is image files")
            images = data.images
            if self.runtime.data_on_device and self.runtime.is_cuda:
                images = images.to(self.runtime.device)
            self._device_arrays[split] = images
        return self._device_arrays[split]

    def device_labels(self, split: str) -> torch.Tensor:
        split = _STORAGE[split]
        if split not in self._device_labels:
            self._device_labels[split] = torch.from_numpy(self._labels[split]).to(self.runtime.device)
        return self._device_labels[split]
