"""Learners: one class per method, each a few hooks on :class:`pilot.learners.base.Learner`.

Each built-in learner's class carries ``@register_learner("<name>")`` (:mod:`pilot.registry`, also
importable from here), and its defaults live in ``configs/method/<name>.yaml``. Importing this package
loads no learner (and no torch): the run loop builds the one a config names from its ``_target_``.
"""

from pilot.registry import register_learner

__all__ = ["register_learner"]
