"""The learners pilot can run: its own, and those that installed packages add.

Three sources feed the registry, and every name must mean one class:

* **Built in.** A class in ``pilot/learners/<module>.py`` decorated with ``@register_learner("name")``.
  Listing them must stay cheap (``--help`` and config errors are answered before torch loads), so the
  names are read from the decorators in the source files, without importing them.
* **Installed packages** (plugins), through two entry-point groups of their metadata::

      [project.entry-points."pilot.learners"]
      ranpac_mini = "pilot_example_plugin.learner:RanPACMini"   # method name = "module:Class"
      [project.entry-points."pilot.configs"]
      pilot_example_plugin = "pilot_example_plugin.configs"      # a package that holds method/<name>.yaml

  :mod:`pilot.config` appends every ``pilot.configs`` folder to Hydra's search path (after pilot's own
  ``configs/``), so ``+method=ranpac_mini`` finds the plugin's method file.
* **Code that is imported** (a notebook, a test) and decorates a class with ``@register_learner``.

A method name is the name of its config file, ``configs/method/<name>.yaml``, whose ``_target_`` is the
class. The run loop never looks a learner up here: Hydra builds ``cfg.method`` from its ``_target_``.
The registry is what lists the methods (``pilot.config.available_options("method")``, error messages,
the tests) and what refuses two classes under one name.

Only the standard library is imported at module level; learner classes load on :meth:`LearnerEntry.load`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Callable, TypeVar

from pilot.errors import ConfigError

LEARNER_GROUP = "pilot.learners"
CONFIG_GROUP = "pilot.configs"
LEARNERS_DIR = Path(__file__).resolve().parent / "learners"
BUILTIN = "pilot"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*\Z")  # a config file name that is also a plain identifier

T = TypeVar("T", bound=type)


class RegistryError(ConfigError):
    """Two classes registered under one method name, or a plugin entry point that cannot be used."""


@dataclass(frozen=True)
class LearnerEntry:
    """One registered learner: its method ``name``, the dotted path of its class (``_target_`` form),
    and where it came from: ``pilot`` (built in), a plugin's distribution name, or the module that
    decorated it at run time."""

    name: str
    target: str
    origin: str
    cls: type | None = None  # set for classes registered by the decorator at run time

    @property
    def builtin(self) -> bool:
        return self.origin == BUILTIN

    def load(self) -> type:
        """The learner class (imports its module, and with it torch)."""
        if self.cls is not None:
            return self.cls
        module, _, name = self.target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise RegistryError(
                f"learner {self.name!r} ({self.origin}): {self.target} cannot be imported: {err}"
            ) from err
        _check_learner_class(self.name, cls)
        return cls

    def describe(self) -> str:
        return f"{self.target} ({'built in' if self.builtin else self.origin})"


_decorated: dict[str, LearnerEntry] = {}


def register_learner(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~pilot.learners.base.Learner` subclass the method ``name``.

    In pilot, put it on the class line of a learner in ``pilot/learners/`` and add
    ``configs/method/<name>.yaml`` (see docs/adding_a_method.md). A package outside pilot declares
    its learners as ``pilot.learners`` entry points instead (the decorator alone is not seen until
    its module is imported). Registering a name that another class already has is refused.
    """
    _check_name(name, "register_learner")

    def decorate(cls: T) -> T:
        _check_learner_class(name, cls)
        entry = LearnerEntry(name, f"{cls.__module__}.{cls.__qualname__}", origin=cls.__module__, cls=cls)
        known = [e for e in _candidates() if e.name == name]
        _refuse_conflicts(name, known + [entry])
        _decorated[name] = entry  # the same class again (a reloaded module) replaces its older copy
        return cls

    return decorate


def learners() -> dict[str, LearnerEntry]:
    """Every registered learner by method name, sorted by name. Raises :class:`RegistryError` when a
    name is registered by two different classes (built in, plugins, decorated code)."""
    by_name: dict[str, list[LearnerEntry]] = {}
    for entry in _candidates():
        by_name.setdefault(entry.name, []).append(entry)
    for name, entries in by_name.items():
        _refuse_conflicts(name, entries)
    return {name: _preferred(by_name[name]) for name in sorted(by_name)}


def learner_names() -> list[str]:
    """The method names, sorted: what ``+method=`` accepts."""
    return list(learners())


def get_learner(name: str) -> type:
    """The learner class registered as ``name`` (imported now)."""
    found = learners().get(name)
    if found is None:
        raise RegistryError(f"No learner is registered as {name!r}. Registered: {', '.join(learner_names())}")
    return found.load()


def builtin_learners() -> dict[str, str]:
    """``{name: dotted class path}`` of the decorated classes in ``pilot/learners/``, read from source."""
    found: dict[str, list[str]] = {}
    for name, target in _scan_builtins():
        found.setdefault(name, []).append(target)
    for name, targets in found.items():
        _refuse_conflicts(name, [LearnerEntry(name, t, BUILTIN) for t in targets])
    return {name: targets[0] for name, targets in sorted(found.items())}


def config_dirs(skip_broken: bool = False) -> list[tuple[str, Path]]:
    """``(label, folder)`` of every ``pilot.configs`` entry point: config roots that hold
    ``method/<name>.yaml`` (and may hold other groups). Finding a folder imports the package's
    parents (keep a plugin's ``__init__`` free of heavy imports), not the learner. An entry point
    whose folder cannot be found raises :class:`RegistryError`, or with ``skip_broken`` is left out
    with a warning."""
    found = []
    for ep in entry_points(group=CONFIG_GROUP):
        try:
            found.append((f"{_distribution(ep)}:{ep.name}", _package_dir(ep)))
        except RegistryError as err:
            if not skip_broken:
                raise
            warnings.warn(f"{err}. Its configs are not used.", stacklevel=2)
    return found


def check_registry() -> None:
    """Raise :class:`RegistryError` when a method name has two classes, or a plugin's entry point is
    unusable. :func:`pilot.config.validate_config` calls it, so a run stops before anything is built."""
    learners()
    config_dirs()


# ------------------------------------------------------------------------------------- internals
def _candidates() -> list[LearnerEntry]:
    entries = [LearnerEntry(name, target, BUILTIN) for name, target in _scan_builtins()]
    for ep in entry_points(group=LEARNER_GROUP):
        _check_name(ep.name, f"entry point {LEARNER_GROUP} of {_distribution(ep)}")
        if not ep.attr:
            raise RegistryError(
                f"entry point {LEARNER_GROUP} {ep.name} = {ep.value!r} of {_distribution(ep)} must name a class "
                f"as 'module:Class'"
            )
        entries.append(LearnerEntry(ep.name, f"{ep.module}.{ep.attr}", _distribution(ep)))
    return entries + list(_decorated.values())


def _preferred(entries: list[LearnerEntry]) -> LearnerEntry:
    """Of entries naming the same class: the built-in one, else a plugin's, else the decorated one."""
    return sorted(entries, key=lambda e: (not e.builtin, e.cls is not None))[0]


def _refuse_conflicts(name: str, entries: list[LearnerEntry]) -> None:
    targets = list(dict.fromkeys(e.target for e in entries))
    if len(targets) > 1:
        classes = [next(e for e in entries if e.target == t).describe() for t in targets]
        raise RegistryError(
            f"The method name {name!r} is registered twice: by {' and by '.join(classes)}. "
            "Rename one of them (its decorator or entry point, and its configs/method/<name>.yaml), or "
            "uninstall the package that should not provide it."
        )


@functools.cache
def _scan_builtins() -> tuple[tuple[str, str], ...]:
    """``(name, dotted class path)`` for each ``@register_learner("name")`` in ``pilot/learners/*.py``."""
    found = []
    for path in sorted(LEARNERS_DIR.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "register_learner" not in source:
            continue
        for node in ast.parse(source, filename=str(path)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for decorator in node.decorator_list:
                name = _decorator_name(decorator)
                if name is not None:
                    found.append((name, f"pilot.learners.{path.stem}.{node.name}"))
    return tuple(found)


def _decorator_name(node: ast.expr) -> str | None:
    """``"l2p"`` for ``@register_learner("l2p")`` (also ``@registry.register_learner(...)``), else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    first = node.args[0]
    if called == "register_learner" and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def _check_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RegistryError(
            f"{where}: method name {name!r} must be lower case letters, digits and underscores, starting with "
            "a letter (it is also the name of the method's config file)"
        )


def _check_learner_class(name: str, cls: object) -> None:
    from pilot.learners.base import Learner  # here: importing it loads torch

    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        raise RegistryError(f"learner {name!r}: {cls!r} is not a subclass of pilot.learners.base.Learner")


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name}" if dist is not None else "an installed package"


def _package_dir(ep: EntryPoint) -> Path:
    where = f"entry point {CONFIG_GROUP} {ep.name} = {ep.value!r} of {_distribution(ep)}"
    if ep.attr:
        raise RegistryError(f"{where}: name a package (the folder that holds method/<name>.yaml), without ':'")
    try:
        spec = importlib.util.find_spec(ep.module)
    except (ImportError, ValueError) as err:
        raise RegistryError(f"{where}: {err}") from err
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = next((Path(f) for f in folders if Path(f).is_dir()), None)
    if folder is None:
        raise RegistryError(f"{where}: {ep.module} is not a package folder on disk (is the package installed?)")
    return folder
