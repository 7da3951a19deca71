"""pilot: class-incremental learning on pre-trained models.

Python API (see :mod:`pilot.api`)::

    import pilot

    cfg = pilot.compose(["+method=simplecil", "dataset=cifar100"])      # a checked config
    table = pilot.run(cfg=cfg, run_dir="results/runs/simplecil_cifar")  # per-session pandas DataFrame

``import pilot`` stays cheap: Hydra, torch and the learners load when a function needs them.

``pilot.run`` is also the name of the run-loop module (``pilot/run.py``, ``from pilot.run import run``),
which Python stores as the package attribute ``run`` once it is imported. So that ``pilot.run(...)`` is
the API function whatever was imported before, ``pilot.run`` is that module made callable: calling it
calls :func:`pilot.api.run`, and its attributes are the run loop's as before.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from pilot.api import compose

if TYPE_CHECKING:
    from pilot.api import run

__version__ = "0.1.0"
__all__ = ["__version__", "compose", "run"]

_RUN_MODULE = f"{__name__}.run"


class _CallableRunModule(types.ModuleType):
    """The class of the ``pilot.run`` module: the module, plus ``__call__`` = :func:`pilot.api.run`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``pilot.run(overrides=[...] | cfg=..., run_dir=...)``: see :func:`pilot.api.run`."""
        from pilot.api import run

        return run(*args, **kwargs)


def _callable(module: types.ModuleType) -> types.ModuleType:
    if type(module) is types.ModuleType:  # a plain module (not yet made callable, not a stand-in)
        module.__class__ = _CallableRunModule
    return module


class _Package(types.ModuleType):
    """The class of the ``pilot`` package: its attribute ``run`` is the callable run-loop module."""

    @property
    def run(self) -> types.ModuleType:
        if "_run_replacement" in self.__dict__:  # e.g. monkeypatch.setattr(pilot, "run", fake)
            return self.__dict__["_run_replacement"]
        module = sys.modules.get(_RUN_MODULE) or importlib.import_module(_RUN_MODULE)
        return _callable(module)

    @run.setter
    def run(self, value: Any) -> None:
        # The import system sets the attribute after importing pilot/run.py.
        if isinstance(value, types.ModuleType) and value.__name__ == _RUN_MODULE:
            self.__dict__.pop("_run_replacement", None)
            _callable(value)
        else:
            self.__dict__["_run_replacement"] = value


sys.modules[__name__].__class__ = _Package
