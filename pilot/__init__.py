"""pilot: class-incremental learning on pre-trained models.

Python API (see :mod:`pilot.api`)::

    import pilot

    cfg = pilot.compose(["+method=simplecil", "dataset=cifar100"])      # a checked config
    table = pilot.run(cfg=cfg, run_dir="results/runs/simplecil_cifar")  # per-session pandas DataFrame

``import pilot`` stays cheap: Hydra, torch and the learners load when a function needs them. The
run loop itself is :func:`pilot.loop.run`.
"""

from __future__ import annotations

from pilot.api import compose, make_learner, run

__version__ = "0.1.0"
__all__ = ["__version__", "compose", "make_learner", "run"]
