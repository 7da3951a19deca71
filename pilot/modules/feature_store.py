"""Frozen-backbone features on disk, shared by the runs of a sweep (one computation per image per sweep).

A seed sweep of SimpleCIL sees the same images through the same frozen pretrained backbone in every
run; only the class order changes. :class:`FeatureStore` keeps each image's features in a file under
``<paths.results_dir>/feature_cache/`` (or ``runtime.feature_cache_dir``), so the second and later runs
read them instead of running the backbone.

**Key.** One file per key, the SHA-256 of everything that changes the features:

* the backbone's ``weights_hash`` and its resolved config (``backbone.*``: pooling, input size...);
* the ``data_hash`` of the image set and the split's storage (``train`` and ``val`` share the
  training images and their ids, so they share a file; ``test`` has its own);
* the test transform (input size, resize, interpolation, normalisation);
* the feature function's name (e.g. ``backbone/pooled``), chosen by the learner;
* the numerics: the autocast dtype in force when the function runs (bf16 and fp32 features differ),
  TF32, channels-last, the device (CUDA: GPU name, CUDA and cuDNN versions; CPU: its vector ISA), and
  the torch and timm versions.

Features are stored in the dtype the function returned (no rounding), so a run that reads them
computes exactly what it would have computed itself (the in-memory :class:`FeatureCache` already
relies on a frozen network's outputs not depending on the rest of the batch).

**No stable identity, no cache.** Random-init backbones (``backbone.pretrained=false``: the weights
follow the seed) and unknown hashes (image folders without a prepared manifest) are never cached on
disk; the store then behaves as the per-run in-memory :class:`FeatureCache`.

**Default: on** (``runtime.feature_cache: true``). A sweep is what users run, and with the rule above
the cache is only used where the identity is certain, so it cannot change a result; the cost is disk
space under the results directory, bounded by ``runtime.feature_cache_gb`` (20 GB by default: the
ViT-B/16 features of CIFAR-100 take 0.2 GB per precision, those of ImageNet-R 0.1 GB).

**Files.** ``<key>.pt``: ``{"meta": key fields + shape + dtype, "values": [split_size, D], "filled":
bool [split_size]}``, read with ``torch.load(weights_only=True)`` when a split is first used, written
atomically (temporary file + ``os.replace``) at the end of each session when rows were added. Writers
hold ``<dir>/.lock`` (filelock) and merge the rows another run wrote since (two seeds of a sweep
running side by side). A file that cannot be read, or whose metadata do not match its key, is logged,
ignored and rewritten. After each write the least recently used files (mtime, refreshed on every
read) are deleted until the directory fits the budget.

The run loop sets :attr:`Runtime.feature_source <pilot.runtime.Runtime>` with
:meth:`FeatureSource.for_run` and calls :meth:`Runtime.flush_feature_stores` after each session, which
saves new rows and logs ``feature cache <function>: N hits, M misses``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from pilot.data.pipeline import TEST, TRAIN, VAL, Batch
from pilot.data.transforms import ImageTransforms
from pilot.modules.features import FeatureCache, FeatureFn
from pilot.runtime import Runtime

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CACHE_DIRNAME = "feature_cache"
LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 600.0
# Weights without a stable identity (pilot.loop.RANDOM_INIT: random init follows the seed).
UNSTABLE_WEIGHTS = frozenset({"random-init"})
_STORAGE = {TRAIN: TRAIN, VAL: TRAIN, TEST: TEST}  # val samples are training images with training ids


def describe_transform(transforms: ImageTransforms) -> dict[str, Any]:
    """The settings of the test transform (what non-augmented batches go through)."""

    def values(t: torch.Tensor | None) -> list[float] | None:
        return None if t is None else [float(v) for v in t.flatten()]

    return {
        "size": transforms.size,
        "resize": transforms.test_resize,
        "interpolation": str(transforms.test_interpolation.value),
        "mean": values(transforms.mean),
        "std": values(transforms.std),
    }


def device_numerics(runtime: Runtime) -> dict[str, Any]:
    """Runtime settings that change a frozen network's outputs, apart from autocast (read per call)."""
    if runtime.is_cuda:
        device: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(runtime.device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32": runtime.tf32,
        }
    else:
        device = {"cpu": torch.backends.cpu.get_cpu_capability()}
    return {**device, "channels_last": runtime.channels_last, "torch": str(torch.__version__), "timm": timm.__version__}


@dataclass(frozen=True)
class FeatureSource:
    """Where a run's frozen features are stored and what they depend on besides the function, the
    split and the autocast dtype: weights, backbone config, image set, test transform, device."""

    directory: Path
    identity: Mapping[str, Any]
    budget_bytes: int

    @classmethod
    def for_run(
        cls,
        cfg: DictConfig,
        runtime: Runtime,
        data_hash: str | None,
        weights_hash: str | None,
        transforms: ImageTransforms,
        decoder: str = "pil",
    ) -> FeatureSource | None:
        """The source of a run (None, logged, when ``runtime.feature_cache`` is off or the weights or
        the data have no stable identity). Directory: ``runtime.feature_cache_dir``, else
        ``<paths.results_dir>/feature_cache``. ``decoder``: who decodes image files (``pil`` or ``device``),
        which changes their pixels by a grey level or two."""
        if not runtime.feature_cache:
            return None
        if not weights_hash or weights_hash in UNSTABLE_WEIGHTS:  # random init: tests, baselines
            log.debug("feature cache off: the backbone weights have no stable identity (%s)", weights_hash)
            return None
        if not data_hash:
            log.info("feature cache off: the dataset has no data_hash (`python -m pilot.data prepare` writes one)")
            return None
        root = runtime.feature_cache_dir or Path(str(cfg.paths.results_dir)).expanduser() / CACHE_DIRNAME
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True) if "backbone" in cfg else None
        identity = {
            "weights": weights_hash,
            "backbone": backbone,
            "data": data_hash,
            "transform": describe_transform(transforms),
            "decoder": decoder,  # image files: PIL in loader workers, or decode_jpeg on the device (gpu_decode)
            **device_numerics(runtime),
        }
        return cls(Path(root).expanduser(), identity, int(runtime.feature_cache_gb * 2**30))


@dataclass
class _Slot:
    """One file's rows in memory: a split's features under one function and autocast dtype."""

    key: str
    meta: dict[str, Any]
    values: torch.Tensor | None = None
    filled: torch.Tensor | None = None
    dirty: bool = False

    @property
    def path_name(self) -> str:
        return f"{self.key}.pt"


class FeatureStore(FeatureCache):
    """A :class:`FeatureCache` of a *frozen* function (named ``function``, e.g. ``backbone/pooled``)
    kept on disk across runs when the runtime has a :class:`FeatureSource`, else in memory only.

    Only non-augmented batches are cached. On disk, a batch is looked up per sample: cached rows are
    read, the others computed (hits and misses are counted per sample), and the new rows are written
    by :meth:`flush`."""

    def __init__(self, runtime: Runtime, function: str) -> None:
        super().__init__()
        self.runtime, self.function = runtime, function
        self.hits = self.misses = 0
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._write_failed = False
        runtime.feature_stores.append(self)

    @property
    def source(self) -> FeatureSource | None:
        return self.runtime.feature_source

    @property
    def on_disk(self) -> bool:
        """Whether outputs go to disk (the run has a :class:`FeatureSource`)."""
        return self.source is not None

    # ---------------------------------------------------------------------------- lookups
    def __call__(self, batch: Batch, fn: FeatureFn, runtime: Runtime | None = None) -> torch.Tensor:
        """``fn(batch.images)``: cached rows read, the others computed (under the caller's autocast)."""
        if batch.augmented or not self.on_disk:
            return super().__call__(batch, fn, runtime)

        def run(images: torch.Tensor) -> torch.Tensor:
            return runtime.chunked(fn, images) if runtime is not None else fn(images)

        slot = self._slot(batch)
        known = slot.filled[batch.ids] if slot.filled is not None else torch.zeros_like(batch.ids, dtype=torch.bool)
        n_known = int(known.sum())
        self.hits += n_known
        self.misses += len(batch) - n_known
        if n_known == len(batch) and slot.values is not None:
            return slot.values[batch.ids]
        if n_known > 0 and slot.values is not None:
            missing = ~known
            computed = run(batch.images[missing])
            if computed.shape[1:] == slot.values.shape[1:] and computed.dtype == slot.values.dtype:
                self._write(slot, batch.ids[missing], computed, batch.split_size)
                return slot.values[batch.ids]
        out = run(batch.images)
        self._write(slot, batch.ids, out, batch.split_size)
        return out

    def lookup(self, batch: Batch) -> torch.Tensor | None:
        """The cached rows of the batch if all of its samples are cached (hits), else None (misses)."""
        if not self.on_disk:
            return super().lookup(batch)
        if batch.augmented:
            return None
        slot = self._slot(batch)
        if slot.filled is None or slot.values is None or not bool(slot.filled[batch.ids].all()):
            self.misses += len(batch)
            return None
        self.hits += len(batch)
        return slot.values[batch.ids]

    def store(self, batch: Batch, out: torch.Tensor) -> None:
        """Keep ``out`` (one row per sample of a non-augmented batch), on disk at the next :meth:`flush`."""
        if not self.on_disk:
            return super().store(batch, out)
        if batch.augmented:
            raise ValueError("outputs on augmented images are not cacheable")
        self._write(self._slot(batch), batch.ids, out, batch.split_size)

    def clear(self) -> None:
        """Forget the rows held in memory (the files stay)."""
        super().clear()
        self._slots.clear()

    def _write(self, slot: _Slot, ids: torch.Tensor, out: torch.Tensor, split_size: int) -> None:
        if slot.values is not None and (slot.values.shape[1:] != out.shape[1:] or slot.values.dtype != out.dtype):
            log.warning(
                "feature cache: %s holds %s %s rows, the function returns %s %s; starting it afresh",
                slot.path_name,
                tuple(slot.values.shape[1:]),
                slot.values.dtype,
                tuple(out.shape[1:]),
                out.dtype,
            )
            slot.values = slot.filled = None
        if slot.values is None or slot.filled is None:
            slot.values = torch.zeros(split_size, *out.shape[1:], dtype=out.dtype, device=out.device)
            slot.filled = torch.zeros(split_size, dtype=torch.bool, device=out.device)
        slot.values[ids.to(slot.values.device)] = out.to(slot.values.device)
        slot.filled[ids.to(slot.filled.device)] = True
        slot.dirty = True

    # ------------------------------------------------------------------------------ slots
    def _slot(self, batch: Batch) -> _Slot:
        """The rows of the batch's split under the current autocast dtype, loaded from disk on first use."""
        source = self.source
        assert source is not None
        device_type = self.runtime.device.type
        autocast = str(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
        split = _STORAGE.get(batch.split, batch.split)
        slot = self._slots.get((split, str(autocast)))
        if slot is not None:
            return slot
        meta = {
            "format": FORMAT_VERSION,
            "function": self.function,
            "split": split,
            "split_size": int(batch.split_size),
            "autocast": autocast,
            **source.identity,
        }
        text = json.dumps(meta, sort_keys=True, default=str)
        key = hashlib.sha256(text.encode()).hexdigest()[:24]
        slot = _Slot(key, json.loads(text))  # plain types only: torch.load(weights_only=True) reads them back
        found = read_file(source.directory / slot.path_name, slot.meta)
        if found is not None:
            slot.values, slot.filled = (t.to(self.runtime.device) for t in found)
            log.debug("feature cache: %s holds %d of %d rows", slot.path_name, int(found[1].sum()), len(found[1]))
        self._slots[(split, str(autocast))] = slot
        return slot

    # ------------------------------------------------------------------------------ disk
    def flush(self) -> None:
        """Write the slots that gained rows (merged with what other runs wrote), then log and reset
        the hit and miss counts."""
        source = self.source
        if source is None:
            return
        if self.hits or self.misses:
            log.info("feature cache %s: %d hits, %d misses", self.function, self.hits, self.misses)
        self.hits = self.misses = 0
        for slot in self._slots.values():
            if slot.dirty and not self._write_failed:
                self._save(source, slot)
            slot.dirty = False

    def _save(self, source: FeatureSource, slot: _Slot) -> None:
        assert slot.values is not None and slot.filled is not None
        size = slot.values.numel() * slot.values.element_size() + slot.filled.numel()
        if size > source.budget_bytes:
            log.warning(
                "feature cache: %s (%.2f GB) exceeds runtime.feature_cache_gb; not saved",
                slot.path_name,
                size / 2**30,
            )
            return
        path = source.directory / slot.path_name
        try:
            source.directory.mkdir(parents=True, exist_ok=True)
            with FileLock(str(source.directory / LOCK_NAME), timeout=LOCK_TIMEOUT_S):
                values, filled = slot.values.cpu(), slot.filled.cpu()
                theirs = read_file(path, slot.meta)
                if theirs is not None and theirs[0].shape == values.shape and theirs[0].dtype == values.dtype:
                    new = theirs[1] & ~filled  # rows another run wrote since this one read the file
                    if bool(new.any()):
                        values = values.clone()
                        values[new], filled = theirs[0][new], filled | new
                        slot.values, slot.filled = values.to(slot.values.device), filled.to(slot.filled.device)
                write_atomically(path, {"meta": slot.meta, "values": values.contiguous(), "filled": filled})
                evict(source.directory, source.budget_bytes, keep=path)
        except (OSError, Timeout) as err:
            self._write_failed = True
            log.warning("feature cache: cannot write %s (%s); this run goes on without saving features", path, err)


def read_file(path: Path, meta: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, filled)`` of a cache file on the CPU, or None when it is missing, unreadable
    (logged) or made for other inputs (logged). A file that is read counts as recently used."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:  # a truncated or foreign file: torch raises several kinds of errors
        log.warning("feature cache: ignoring unreadable %s (%s: %s)", path, type(err).__name__, err)
        return None
    values = data.get("values") if isinstance(data, dict) else None
    filled = data.get("filled") if isinstance(data, dict) else None
    size = meta.get("split_size")
    if (
        not isinstance(values, torch.Tensor)
        or not isinstance(filled, torch.Tensor)
        or data.get("meta") != dict(meta)
        or filled.dtype != torch.bool
        or filled.shape != (size,)
        or values.ndim < 1
        or len(values) != size
    ):
        log.warning("feature cache: ignoring %s, made for other inputs or damaged", path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)
    return values, filled


def write_atomically(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to a temporary file beside ``path``, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def evict(directory: Path, budget_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used (oldest mtime) ``*.pt`` files of ``directory`` until the rest
    fit ``budget_bytes``, never ``keep``; returns the deleted files."""
    files = []
    for path in directory.glob("*.pt"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    deleted = []
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= budget_bytes:
            break
        if keep is not None and path == keep:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            deleted.append(path)
            total -= size
    if deleted:
        log.info("feature cache: deleted %d least recently used file(s) to stay within the budget", len(deleted))
    return deleted
