"""A replay memory of exemplars: which training images each seen class keeps, and their class means.

Size rule (LAMDA-PILOT ``models/base.py``, ``samples_per_class``; keys ``memory_size``,
``memory_per_class``, ``fixed_memory``): after a session that brings the seen classes to ``t``, each
class keeps

    m = memory_per_class              (fixed_memory: the memory grows with the classes)
    m = floor(memory_size / t)        (otherwise: a fixed total, shared by the classes seen)

exemplars (fewer where a class has fewer training images). At the end of every session
(:meth:`ExemplarMemory.update`, PILOT's ``build_rehearsal_memory``):

1. every old class keeps the first ``m`` of its exemplars (``_reduce_exemplar``; with a fixed
   per-class size nothing is dropped), so the selection order is a ranking;
2. each new class selects ``m`` exemplars by *herding* (Rebuffi et al., "iCaRL: Incremental Classifier
   and Representation Learning", CVPR 2017, Alg. 4; PILOT ``_construct_exemplar``) on L2-normalised
   features ``phi(x) = f(x) / (||f(x)|| + 1e-8)`` of its training images (test transform)::

       mu = (1/n) sum_i phi(x_i)
       p_k = argmin_{x not yet chosen} || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||      k = 1..m

   (ties go to the first image in class-sorted order), or at random (``selection="random"``, the
   global torch RNG, so a run's seed fixes it);
3. the class mean of every seen class is recomputed with the current network from its exemplars
   (PILOT's ``_class_means``, no flip averaging)::

       mean_c = normalise( (1/|P_c|) sum_{p in P_c} phi(p) )

Nearest-mean-of-exemplars classification (iCaRL's NME, PILOT ``_eval_nme``) scores a test image
``x`` by ``-|| phi(x) - mean_c ||^2`` (:meth:`ExemplarMemory.nme_logits`), whose argmax is PILOT's
nearest mean. Herding and the means are computed in float64; the features come from the run's
autocast. The exemplars (sample ids of the training split, class-sorted, each class in selection
order) and the means are buffers: a checkpoint holds them and a resumed run continues with the same
memory.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from pilot.data.pipeline import TRAIN, SessionData
from pilot.data.scenario import Scenario
from pilot.errors import ConfigError
from pilot.modules.features import extract_features
from pilot.runtime import Runtime

EPSILON = 1e-8  # PILOT's EPSILON in the feature normalisation
SELECTIONS = ("herding", "random")


def normalise(features: torch.Tensor) -> torch.Tensor:
    """``f / (||f|| + 1e-8)`` row-wise, as PILOT normalises features before herding and NME."""
    return features / (features.norm(dim=1, keepdim=True) + EPSILON)


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the ``m`` rows that iCaRL's herding selects, in selection order.

    ``features``: ``[n, D]`` already normalised. Each step takes the row that brings the mean of the
    chosen rows closest to the mean of all rows; chosen rows are not chosen again (float64)."""
    feats = features.double()
    target = feats.mean(dim=0)
    chosen = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    total = torch.zeros_like(target)
    order = []
    for k in range(1, min(m, len(feats)) + 1):
        distance = ((target - (feats + total) / k) ** 2).sum(dim=1)
        i = int(distance.masked_fill(chosen, float("inf")).argmin())
        order.append(i)
        chosen[i] = True
        total += feats[i]
    return torch.as_tensor(order, dtype=torch.long, device=feats.device)


def exemplar_mean(features: torch.Tensor) -> torch.Tensor:
    """The NME class mean of normalised exemplar features: their mean, normalised (float64)."""
    mean = features.double().mean(dim=0)
    return mean / mean.norm()


def check_memory_fits(memory_size: int, memory_per_class: int, fixed_memory: bool, scenario: Scenario) -> None:
    """Refuse a memory that cannot keep one exemplar of every class of ``scenario`` (ConfigError)."""
    classes = scenario.num_classes
    if fixed_memory and memory_per_class < 1:
        raise ConfigError(
            f"method.memory_per_class={memory_per_class} with method.fixed_memory=true keeps no exemplar: "
            "set method.memory_per_class >= 1 (LAMDA-PILOT: 20)."
        )
    if not fixed_memory and memory_size // classes < 1:
        raise ConfigError(
            f"method.memory_size={memory_size} cannot keep one exemplar per class for the {classes} classes of "
            f"scenario {scenario.name} (each class keeps memory_size // seen classes). Set "
            f"method.memory_size >= {classes}, or method.fixed_memory=true with method.memory_per_class >= 1."
        )


class ExemplarMemory(nn.Module):
    """Exemplars (training-split sample ids) of every seen class and their NME class means."""

    ids_buffer: torch.Tensor  # [N] sample ids, class-sorted, each class in selection order
    labels: torch.Tensor  # [N] class of each exemplar
    class_means: torch.Tensor  # [seen classes, D] float32: normalised means of the exemplars' features

    def __init__(self, memory_size: int, memory_per_class: int, fixed_memory: bool, selection: str = "herding") -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r}: use one of {SELECTIONS}")
        self.memory_size, self.memory_per_class = int(memory_size), int(memory_per_class)
        self.fixed_memory, self.selection = bool(fixed_memory), selection
        self.register_buffer("ids_buffer", torch.zeros(0, dtype=torch.long))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_means", torch.zeros(0, 0))

    # --------------------------------------------------------------------------------- sizes
    def per_class(self, seen_classes: int) -> int:
        """Exemplars per class once ``seen_classes`` classes are seen (PILOT's ``samples_per_class``)."""
        if self.fixed_memory:
            return self.memory_per_class
        if seen_classes < 1:
            raise ValueError("seen_classes must be >= 1")
        return self.memory_size // seen_classes

    def check_fits(self, scenario: Scenario) -> None:
        """ConfigError when the memory cannot keep an exemplar of every class of ``scenario``."""
        check_memory_fits(self.memory_size, self.memory_per_class, self.fixed_memory, scenario)

    def __len__(self) -> int:
        return len(self.ids_buffer)

    def ids(self) -> np.ndarray:
        """Training-split sample ids of every exemplar, class-sorted (each class in selection order)."""
        return self.ids_buffer.cpu().numpy()

    def counts(self) -> dict[int, int]:
        """Exemplars kept per class."""
        classes, counts = torch.unique(self.labels, return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist()))

    def to_rows(self) -> list[dict[str, int]]:
        """One row per exemplar: ``class``, ``sample_id`` (training split) and ``rank`` (0 = chosen first)."""
        rows, previous, rank = [], None, 0
        for label, sample in zip(self.labels.tolist(), self.ids_buffer.tolist()):
            rank = rank + 1 if label == previous else 0
            previous = label
            rows.append({"class": label, "sample_id": sample, "rank": rank})
        return rows

    # -------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        session: SessionData,
        runtime: Runtime,
        known: int,
        total: int,
        batch_size: int = 128,
    ) -> None:
        """End of a session that brought the seen classes from ``known`` to ``total``: keep the first
        ``per_class(total)`` exemplars of every old class, select those of ``session``'s new classes,
        and recompute every class mean with ``features`` (the current network; callers put it in eval
        mode). Feature passes use the test transform, in batches of ``batch_size``."""
        m = self.per_class(total)
        keep = _first_per_class(self.labels, m)
        old_ids, old_labels = self.ids_buffer[keep], self.labels[keep]
        means: list[torch.Tensor] = []
        index = session.info.index
        if len(old_ids):
            batches = session.sample_batches(old_ids.cpu().numpy(), batch_size)
            feats, labels = extract_features(features, batches, runtime, desc=f"exemplar means s{index}")
            feats = normalise(feats.double())
            means += [exemplar_mean(feats[labels == c]) for c in range(known)]
        new_ids = session.pipeline.indices(TRAIN, session.info.new_classes)
        batches = session.sample_batches(new_ids, batch_size)
        feats, labels = extract_features(features, batches, runtime, desc=f"exemplar selection s{index}")
        feats, labels = normalise(feats.double()), labels.cpu()
        all_new = torch.as_tensor(new_ids, dtype=torch.long)
        chosen_ids, chosen_labels = [old_ids.cpu()], [old_labels.cpu()]
        for c in session.info.new_classes:
            rows = torch.nonzero(labels == c).flatten()
            order = self._select(feats[rows.to(feats.device)], m).cpu()
            chosen_ids.append(all_new[rows[order]])
            chosen_labels.append(torch.full((len(order),), c, dtype=torch.long))
            means.append(exemplar_mean(feats[rows[order].to(feats.device)]))
        device = self.ids_buffer.device
        self.ids_buffer = torch.cat(chosen_ids).to(device)
        self.labels = torch.cat(chosen_labels).to(device)
        self.class_means = torch.stack(means).float().to(device)

    def _select(self, features: torch.Tensor, m: int) -> torch.Tensor:
        if self.selection == "herding":
            return herding_order(features, m)
        return torch.randperm(len(features))[:m]

    # ----------------------------------------------------------------------------------- NME
    def nme_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``-||phi(x) - mean_c||^2`` for every seen class ``c``: ``[B, seen classes]``, float32."""
        feats = normalise(features.double())
        means = self.class_means.to(feats.device, torch.float64)
        squared = feats.pow(2).sum(1, keepdim=True) - 2 * feats @ means.T + means.pow(2).sum(1)
        return -squared.float()

    # ---------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
    ) -> None:
        # The memory's size is known only once its data is seen: take the checkpoint's shapes.
        for name in ("ids_buffer", "labels", "class_means"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                current = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)


def _first_per_class(labels: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the first ``m`` entries of each class in a class-sorted ``labels`` vector."""
    if len(labels) == 0:
        return torch.zeros(0, dtype=torch.bool, device=labels.device)
    starts = torch.searchsorted(labels, labels, right=False)  # first position of each entry's class
    return torch.arange(len(labels), device=labels.device) - starts < m
