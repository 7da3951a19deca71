"""Configuration helpers: custom resolvers, and validation that runs before any expensive work."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pilot.errors import ConfigError, PilotError
from pilot.resources import shipped_dir

CONFIG_DIR = shipped_dir("configs", "train.yaml")  # top-level configs/ in a checkout, pilot/configs in a wheel
# Arguments the run loop passes to these config nodes itself (not set in YAML).
INJECTED_ARGS = {"method": {"setup"}, "scenario": {"num_classes"}}
INSTANTIATED_GROUPS = ("dataset", "scenario", "backbone", "transforms", "runtime", "method")


def per_dataset(table: dict[str, Any], default: Any, *, _root_: DictConfig) -> Any:
    """Resolver ``${per_dataset:{imagenet_r: 50}, 20}``: the value for the chosen dataset, else the default.

    Method configs use it for the reference settings that differ between datasets (epochs, batch
    sizes, learning rates), keeping all of a method's defaults in its one YAML file.
    """
    return table.get(str(_root_.labels.dataset), default)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("per_dataset"):
        OmegaConf.register_new_resolver("per_dataset", per_dataset)


class PluginConfigs(SearchPathPlugin):
    """Hydra search-path plugin: after pilot's own ``configs/``, the config folders that installed
    packages declare as ``pilot.configs`` entry points (:func:`pilot.registry.config_dirs`), so that
    ``+method=NAME`` finds a plugin's ``method/NAME.yaml``. pilot's files come first: a plugin cannot
    replace them. Registered with Hydra by :func:`use_plugin_configs`, for ``@hydra.main`` and
    :func:`compose_config` alike."""

    def manipulate_search_path(self, search_path: Any) -> None:
        for label, folder in plugin_config_dirs(skip_broken=True):  # validate_config names what is broken
            search_path.append(provider=f"pilot-plugin {label}", path=f"file://{folder}")


def use_plugin_configs() -> None:
    """Register :class:`PluginConfigs` with Hydra (idempotent). Runs when this module is imported,
    before ``pilot.train``'s ``@hydra.main`` or :func:`compose_config` builds a search path."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(PluginConfigs)


use_plugin_configs()


def plugin_config_dirs(skip_broken: bool = False) -> list[tuple[str, Path]]:
    """``(label, folder)`` of the config folders of installed plugins (none without plugins)."""
    from pilot.registry import config_dirs

    return config_dirs(skip_broken)


def config_roots(skip_broken: bool = False) -> list[Path]:
    """Every folder Hydra composes from, in search order: pilot's ``configs/``, then the plugins'."""
    return [CONFIG_DIR, *(folder for _, folder in plugin_config_dirs(skip_broken))]


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line style ``overrides`` outside ``@hydra.main``
    (tests, benchmarks, notebooks), register it as the current Hydra config so that ``${hydra:...}``
    labels resolve, and drop the ``hydra`` node, as the entry point's task function sees it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    use_plugin_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    apply_method_presets(cfg, cfg_choice("method"), overrides)
    return cfg


def cfg_choice(group: str) -> str | None:
    """The option chosen for config ``group`` in the current Hydra config (None if none)."""
    return HydraConfig.get().runtime.choices.get(group)


def _leaf_paths(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of a plain nested dict (lists are leaves)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def command_line_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that command-line ``overrides`` set as values (``a.b=1``, ``+a.b=1``,
    ``++a.b=1``, ``~a.b``), leaving out config-group choices (``dataset=cifar100``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    roots = config_roots(skip_broken=True)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra") or any((root / key).is_dir() for root in roots):
            continue
        keys.add(key)
    return keys


def apply_method_presets(cfg: DictConfig, method: str | None, overrides: Sequence[str]) -> None:
    """Merge ``cfg.for_method[method]`` into ``cfg`` and remove ``for_method``.

    A multi-method preset (``experiment=pilot_reference``) cannot write ``method.reference_prefix_layout``
    for every learner, since only DualPrompt has that parameter; it writes it under
    ``for_method.dualprompt.method`` instead. Precedence: method file < preset < ``for_method`` <
    command line: a value whose key (or a parent of it) is set in ``overrides`` is left alone.
    Values are copied unresolved, so interpolations such as ``${per_dataset:...}`` keep working.
    """
    if "for_method" not in cfg:
        return
    presets = OmegaConf.to_container(cfg.for_method, resolve=False) or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"for_method must map method names to settings, got {type(presets).__name__}")
    explicit = command_line_keys(overrides)
    with open_dict(cfg):
        del cfg["for_method"]
        for path, value in _leaf_paths(presets.get(method, {}) if method else {}):
            if not any(path == key or path.startswith(key + ".") for key in explicit):
                OmegaConf.update(cfg, path, value, merge=True, force_add=True)


def available_options(group: str) -> list[str]:
    """The options of config ``group``: for ``method``, the registered learners (built in and from
    plugins, :mod:`pilot.registry`); for the other groups, the YAML files of pilot's ``configs/<group>/``
    and of the plugins' config folders."""
    if group == "method":
        from pilot.registry import learner_names

        return learner_names()
    return sorted({p.stem for root in config_roots(skip_broken=True) for p in (root / group).glob("*.yaml")})


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, with a message that says how to fix it, on the mistakes a user can make in YAML or
    on the command line that Hydra itself lets through: a missing method or mandatory value, a key
    that is not a parameter, and a value of the wrong type or out of range (see :mod:`pilot.schema`:
    the allowed values come from the annotations of the callables the config builds).

    Runs before any model is built or data read. Signatures are read from source, so it imports
    neither torch nor the learners (only a key that no stand-in lists, or a foreign ``_target_``,
    makes it import that target).
    """
    from pilot import schema  # here, not at the top: importing pilot.config stays cheap
    from pilot.registry import check_registry

    check_registry()  # a method name with two classes, or a broken plugin: refused before anything runs
    if "method" not in cfg or cfg.method is None:
        raise ConfigError(f"No method chosen. Add +method=NAME, one of: {', '.join(available_options('method'))}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"These config values are mandatory and not set: {', '.join(missing)} "
            f"(e.g. {missing[0]}=<value> on the command line)"
        )
    for key, (annotation, default) in schema.TOP_LEVEL.items():
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            value = _resolved(cfg, key)
            if not schema.is_valid(annotation, value):
                raise ConfigError(schema.bad_value_message(key, value, annotation, default))
    nodes = [(group, _resolved(cfg, group)) for group in INSTANTIATED_GROUPS]
    nodes += [(f"logger.{name}", _resolved(cfg, f"logger.{name}")) for name in cfg.get("logger") or {}]
    for path, node in nodes:
        schema.check_node(path, node, injected=INJECTED_ARGS.get(path, set()))


_ABSENT = object()


def _resolved(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` as plain Python data, interpolations resolved."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    except Exception as err:  # noqa: BLE001 - OmegaConf raises several kinds; all mean a bad value
        raise ConfigError(f"{key}: a value cannot be resolved: {err}") from err


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and check a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()  # deleted on close
    except OSError as err:
        raise ConfigError(
            f"Results directory {path} is not writable ({err.strerror}). "
            "Set paths.results_dir=<a writable folder> (or hydra.run.dir=...)."
        ) from err
    return path


class CheckResultsDir(Callback):
    """Hydra callback: before Hydra creates the run (or sweep) directory, check that it can be
    written, and stop with one clear message instead of Hydra's traceback if it cannot."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # as run_job does next: lets ${hydra:...} resolve
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(run_dir: str) -> None:
        path = Path(os.path.expanduser(run_dir))
        existing = next(p for p in [path, *path.parents] if p.exists())
        try:
            ensure_writable_dir(existing if existing.is_dir() else path)
        except ConfigError as err:
            print(f"ConfigError: {err}", file=sys.stderr)
            raise SystemExit(2) from None


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a :class:`PilotError` raised by the target through
    unwrapped (Hydra wraps every exception in an ``InstantiationException``)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, PilotError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
