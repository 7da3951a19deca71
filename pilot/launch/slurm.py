"""The Hydra callback of the SLURM presets: every job of the sweep starts with ``resume=auto``.

``hydra/launcher=slurm`` runs each job of a sweep as a SLURM array task through submitit
(hydra-submitit-launcher). When a task is about to time out, or is preempted, submitit calls the
launcher's ``checkpoint()``, which resubmits the same job (the same overrides and job number, so the
same run directory ``<sweep dir>/<job num>_<method>_<dataset>_s<seed>``), and requeues it. The
requeued job runs the task function from the start: with ``resume=auto`` it continues after the last
session in its run directory's checkpoint instead of being refused because the directory holds
results (see :func:`pilot.rundir.check_start`).

:class:`ResumeAuto` adds ``resume=auto`` to Hydra's config-defined sweep parameters
(``hydra.sweeper.params``), which the sweeper puts before the command-line overrides: every job gets
``resume=auto``, and a ``resume=...`` on the command line still wins.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from pilot.rundir import AUTO

log = logging.getLogger(__name__)


class ResumeAuto(Callback):
    """Hydra callback (``hydra.callbacks``): before a multirun's sweeper is built, add
    ``resume: auto`` to ``hydra.sweeper.params`` unless they set ``resume`` already."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if "params" not in sweeper:
            log.warning(
                "%s has no params: jobs start without resume=auto; add resume=auto to the command so that a "
                "requeued job continues its run directory",
                sweeper.get("_target_", "the sweeper"),
            )
            return
        with read_write(config.hydra), open_dict(config.hydra):
            params = dict(sweeper.params or {})
            params.setdefault("resume", AUTO)
            sweeper.params = params
