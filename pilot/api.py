"""Python API: compose a configuration and run it from Python (notebooks, scripts, your own sweeps).

::

    import pilot

    cfg = pilot.compose(["+method=simplecil", "dataset=cifar100", "scenario=b0inc10"])
    cfg.method.batch_size = 64                       # edit it like any OmegaConf config
    table = pilot.run(cfg=cfg, run_dir="results/runs/simplecil_cifar")
    # or in one step: pilot.run(["+method=simplecil", "dataset=cifar100"], run_dir=...)
    print(table[["session", "acc", "acc_avg", "forgetting"]])

The overrides are the command line's (``+method=NAME``, ``group=option``, ``key=value``), composed from
the same files, checked the same way and run by the same loop as ``python -m pilot.train``; the run
directory gets the same files (``sessions.csv``, ``matrix.csv``, ``checkpoint.pt``...), and
``resume=true`` / ``overwrite=true`` work as on the command line. Progress is reported through the
``logging`` module (logger ``pilot``): ``logging.basicConfig(level=logging.INFO)`` shows a line per session.

To build one learner by hand (a notebook, a test, a fidelity script), :func:`make_learner` takes the
method's configured defaults and overrides some of them::

    learner = pilot.make_learner("ease", backbone, scenario, runtime, epochs=1, adapter_dim=8)

Importing this module is cheap: Hydra, torch and the learners load inside the functions.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

    from pilot.backbones.backbone import Backbone
    from pilot.data.scenario import Scenario
    from pilot.learners.base import Learner
    from pilot.runtime import Runtime

__all__ = ["compose", "run", "make_learner", "default_run_dir"]


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The run configuration for command-line style ``overrides``, composed and checked.

    ``overrides``: e.g. ``["+method=l2p", "dataset=cifar100", "method.epochs=3"]``. Returns the config
    the entry point's task function would get (no ``hydra`` node, ``experiment`` presets applied),
    validated against the signatures of what it builds (:func:`pilot.config.validate_config`), without
    importing torch. Its ``labels`` (method, dataset, backbone) are stored as values, so the config stays
    correct when another one is composed before it runs.

    Raises :class:`pilot.errors.ConfigError` for any mistake: an unknown option or key, an override
    that does not parse, a value of the wrong type or out of range, no ``+method=``.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from pilot.config import compose_config, validate_config
    from pilot.errors import ConfigError

    overrides = _as_list(overrides)
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{' '.join(overrides)}: {err}") from err
    try:
        labels = OmegaConf.to_container(cfg.labels, resolve=True)  # ${hydra:...}: only right until the next compose
    except OmegaConfBaseException as err:
        raise ConfigError(f"labels cannot be resolved: {err}") from err
    with open_dict(cfg):
        cfg.labels = labels
    validate_config(cfg)
    return cfg


def make_learner(
    method: str,
    backbone: Backbone,
    scenario: Scenario,
    runtime: Runtime,
    *,
    overrides: Sequence[str] = (),
    **settings: Any,
) -> Learner:
    """Learner ``method`` (a registered name) on ``backbone``, ``scenario`` and ``runtime``, with the
    settings of ``configs/method/<method>.yaml`` (composed with ``overrides``, e.g. ``["dataset=imagenet_r"]``
    for that dataset's values) and then ``settings`` (flat ``method.*`` keys, Python values: factories,
    lists...) over them."""
    from pilot.config import build

    cfg = compose([f"+method={method}", *_as_list(overrides)])
    factory = build(cfg.method, _partial_=True)  # nested nodes (optimisers) built; the learner not yet
    learner: Learner = factory.func.create(backbone, scenario, runtime, **{**factory.keywords, **settings})
    return learner


def run(
    overrides: Sequence[str] | None = None,
    *,
    cfg: DictConfig | None = None,
    run_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Run one class-incremental experiment and return its per-session table.

    Pass either ``overrides`` (composed with :func:`compose`) or a ``cfg`` from :func:`compose`.
    ``run_dir``: where the run writes its files; by default the directory the command line would
    choose, ``<paths.results_dir>/runs/<date>_<time>_<method>_<dataset>_s<seed>``. The table has one row
    per session with the run loop's records: the metrics and times of ``sessions.csv`` (``acc``,
    ``acc_old``, ``acc_new``, ``acc_avg``, ``forgetting``, ``bwt``, times, parameter counts...), without
    the columns that name the run (``run_id``, ``method``, ...; read ``sessions.csv`` for those).
    ``table.attrs["run_dir"]`` is the run directory. With ``resume=true`` the table holds the resumed
    sessions as well as the new ones.

    Errors are :class:`pilot.errors.PilotError` subclasses (ConfigError, DatasetError, ResumeError...,
    and RunInterruptedError on Ctrl-C, after which ``resume=true`` continues the run).
    """
    if (overrides is None) == (cfg is None):
        raise TypeError("pilot.run() takes either overrides=[...] or cfg=pilot.compose([...]), not both or neither")
    if overrides is not None:  # then cfg is None (checked above)
        cfg = compose(_as_list(overrides))
    assert cfg is not None
    from pilot.loop import run as run_loop  # only now: loads torch, timm and the learners

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    table = run_loop(cfg, run_dir)
    table.attrs["run_dir"] = str(run_dir)
    return table


def default_run_dir(cfg: DictConfig) -> Path:
    """The run directory ``python -m pilot.train`` would use for ``cfg`` now (``hydra.run.dir`` in
    ``configs/train.yaml``): ``<paths.results_dir>/runs/<date>_<time>_<method>_<dataset>_s<seed>``."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    name = f"{stamp}_{cfg.labels.method}_{cfg.labels.dataset}_s{cfg.seed}"
    return Path(str(cfg.paths.results_dir)).expanduser() / "runs" / name


def _as_list(overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(f"overrides must be a list of strings such as ['+method=l2p'], got {overrides!r}")
    return list(overrides)
