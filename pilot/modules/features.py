"""Passes of a network over a stream of batches, and a cache for frozen networks."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sized

import torch
from torch import nn

from pilot import distributed
from pilot.data.pipeline import Batch
from pilot.runtime import Runtime

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def extract_features(
    fn: FeatureFn,
    batches: Iterable[Batch],
    runtime: Runtime,
    desc: str = "features",
    cache: "FeatureCache | None" = None,
    full_precision: bool = False,
    eval_mode: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` over every batch; returns float32 features ``[N, D]`` and labels ``[N]`` on the device.

    In a data-parallel run each rank computes its parts of the batches and every rank returns the
    features of all of them, in the order of a one-process pass (:func:`pilot.distributed.gather_in_order`).

    ``fn`` runs under the run's autocast, or in float32 with ``full_precision`` (for features that
    become stored statistics such as covariances; see :mod:`pilot.modules.precision`). ``eval_mode``:
    a module put in eval mode for the pass (dropout off, BatchNorm on running statistics) and given
    back its training mode afterwards.
    """
    with evaluating(eval_mode):
        return _extract(fn, batches, runtime, desc, cache, full_precision)


@contextlib.contextmanager
def evaluating(module: nn.Module | None) -> Iterator[None]:
    """``module`` (if any) in eval mode inside the block; ``module.train(was_training)`` after it."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


def _extract(
    fn: FeatureFn,
    batches: Iterable[Batch],
    runtime: Runtime,
    desc: str,
    cache: "FeatureCache | None",
    full_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels, sizes = [], [], []
    for batch in runtime.progress_bar(batches, desc=desc, total=len(batches) if isinstance(batches, Sized) else None):
        sizes.append(slice(batch.global_size, getattr(batches, "unit", 1)))
        if len(batch) == 0:  # a data-parallel rank's empty part of a small last batch
            continue
        with runtime.autocast() if not full_precision else contextlib.nullcontext():
            out = cache(batch, fn, runtime) if cache is not None else runtime.chunked(fn, batch.images)
        feats.append(out.float())
        labels.append(batch.labels)
    if distributed.active():  # every rank gets the features of the whole stream, in the one-process order
        return distributed.gather_in_order(feats, sizes), distributed.gather_in_order(labels, sizes)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Outputs of a *frozen* function on deterministic inputs, stored per (split, sample id).

    Evaluation after session k revisits the test images of every earlier session; with a frozen
    network their features never change, so each is computed once per run. Augmented batches are
    never cached. The cache is not part of any checkpoint: a resumed run refills it.
    :class:`pilot.modules.feature_store.FeatureStore` extends it to files shared across runs.
    """

    def __init__(self) -> None:
        self._values: dict[str, torch.Tensor] = {}
        self._valid: dict[str, torch.Tensor] = {}

    def __call__(self, batch: Batch, fn: FeatureFn, runtime: Runtime | None = None) -> torch.Tensor:
        """``fn(batch.images)``, from the cache where every sample of the batch is already there.
        With ``runtime``, misses are computed in CPU-sized chunks (:meth:`Runtime.chunked`)."""
        if batch.augmented:
            return fn(batch.images)
        cached = self.lookup(batch)
        if cached is not None:
            return cached
        out = runtime.chunked(fn, batch.images) if runtime is not None else fn(batch.images)
        self.store(batch, out)
        return out

    def lookup(self, batch: Batch) -> torch.Tensor | None:
        """The cached outputs of the batch if every one of its samples is cached, else None."""
        valid = self._valid.get(batch.split)
        if batch.augmented or valid is None or not bool(valid[batch.ids].all()):
            return None
        return self._values[batch.split][batch.ids]

    def store(self, batch: Batch, out: torch.Tensor) -> None:
        """Keep ``out`` (one row per sample of a non-augmented batch) for later lookups."""
        if batch.augmented:
            raise ValueError("outputs on augmented images are not cacheable")
        if batch.split not in self._values:
            self._values[batch.split] = torch.empty(
                batch.split_size, *out.shape[1:], dtype=out.dtype, device=out.device
            )
            self._valid[batch.split] = torch.zeros(batch.split_size, dtype=torch.bool, device=out.device)
        self._values[batch.split][batch.ids] = out.to(self._values[batch.split].dtype)
        self._valid[batch.split][batch.ids] = True

    def clear(self) -> None:
        self._values.clear()
        self._valid.clear()
