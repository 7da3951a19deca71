"""The interface every results sink implements, and the per-epoch hook that feeds the sinks."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class Sink(ABC):
    """Receives one record per finished session, plus that session's row of the accuracy matrix.

    ``open`` is given the records of sessions finished before a resume (empty for a fresh run):
    a sink must end up holding each session exactly once. ``log_epoch`` hears the training loss and
    learning rate after every epoch of the shared epoch loop (by default a sink ignores them).
    """

    @abstractmethod
    def open(
        self,
        run_dir: Path,
        provenance: dict[str, Any],
        config: dict[str, Any],
        previous: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    ) -> None: ...

    @abstractmethod
    def write(self, record: dict[str, Any], matrix_rows: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def close(self, summary: dict[str, Any]) -> None: ...

    def log_epoch(self, session: int, epoch: int, loss: float, lr: float) -> None:
        """One finished training epoch of ``session`` (both from 0): its mean loss and its lr."""


def epoch_hook(sinks: Sequence[Sink], session: int) -> Callable[[int, float, float], None]:
    """The ``runtime.on_epoch`` of one session (:data:`pilot.learners.training.EpochHook`): passes
    each epoch on to every sink's ``log_epoch``. A sink that fails is reported and skipped, so a
    listener can never stop the training."""

    def on_epoch(epoch: int, loss: float, lr: float) -> None:
        for sink in sinks:
            try:
                sink.log_epoch(session, epoch, loss, lr)
            except Exception as err:  # noqa: BLE001 - a listener must not break training
                log.warning("%s.log_epoch failed (%s: %s)", type(sink).__name__, type(err).__name__, err)

    return on_epoch
