"""The learner registry: built-in learners, plugins through entry points, the example plugin end to end.

The example plugin (examples/pilot_example_plugin) is made visible to this process without installing
anything: setuptools' PEP 517 hook ``prepare_metadata_for_build_wheel`` writes the very
``*.dist-info`` (METADATA, entry_points.txt) that ``pip install`` would, from the plugin's
pyproject.toml, into a temporary folder; that folder and the plugin's ``src/`` go on ``sys.path``, where
``importlib.metadata`` finds the entry points. It takes about half a second, needs no network and no
build isolation, and leaves the shared environment untouched (``pip install -e`` would change it for
every other test and process until uninstalled). Both leave ``sys.path`` when the tests are done.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, compose_config, run_config, small_overrides
from omegaconf import OmegaConf

from pilot import registry
from pilot.config import available_options, config_roots, validate_config
from pilot.errors import ConfigError
from pilot.learners.base import Learner
from pilot.loop import RunInterrupted
from pilot.registry import RegistryError, get_learner, learner_names, learners, register_learner

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "examples" / "pilot_example_plugin"
PLUGIN_METHOD = "ranpac_mini"
APER = {"aper_adapter", "aper_ssf", "aper_vpt_shallow", "aper_vpt_deep", "aper_finetune"}  # one module, five names
BUILTIN = {"simplecil", "l2p", "dualprompt", "coda", "ease", "slca", "ranpac", "fecam", "mos", "lae", "cofima", "duct"}
BUILTIN |= {"finetune", "icarl", "der", "memo", "foster", "coil", "dgr"}
BUILTIN |= APER
# Two sessions of two classes on the tiny ViT and synthetic images.
TWO_SESSIONS = ["dataset.num_classes=4", "scenario=b0inc2"]
# Columns of sessions.csv that are results (not times, dates or memory); a resumed run must equal them.
METRICS = [
    "run_id",
    "group_id",
    "method",
    "session",
    "n_seen",
    "n_new",
    "acc",
    "acc_top5",
    "acc_old",
    "acc_new",
    "acc_avg",
    "forgetting",
    "bwt",
    "n_test",
    "params_total",
    "params_trainable",
]


def assert_resumes_identically(overrides: list[str], tmp_path: Path) -> None:
    """A run interrupted after session 0 and resumed writes the uninterrupted run's results."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    table = run_config(overrides, full)
    with pytest.raises(RunInterrupted):
        run_config(overrides + ["debug.stop_after_session=0"], cut)
    assert pd.read_csv(cut / "sessions.csv")["session"].tolist() == [0]
    run_config(overrides + ["resume=true"], cut)
    expected = pd.read_csv(full / "sessions.csv")
    assert expected["n_seen"].tolist() == [2, 4]
    assert expected["acc"].between(0, 100).all()
    pd.testing.assert_frame_equal(pd.read_csv(cut / "sessions.csv")[METRICS], expected[METRICS])
    pd.testing.assert_frame_equal(pd.read_csv(cut / "matrix.csv"), pd.read_csv(full / "matrix.csv"))
    assert table["acc"].tolist() == pytest.approx(expected["acc"].tolist(), abs=1e-3)


@pytest.fixture
def decorated(monkeypatch):
    """Learners decorated inside a test stay registered for that test only."""
    monkeypatch.setattr(registry, "_decorated", dict(registry._decorated))


def fake_distribution(folder: Path, name: str, entry_points: str) -> Path:
    """A ``<name>-0.1.dist-info`` with ``entry_points`` in ``folder``: an installed package to importlib.metadata."""
    dist = folder / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return folder


# ------------------------------------------------------------------------------------ the registry
def test_builtin_learners_are_registered_and_are_the_method_options():
    entries = learners()
    assert BUILTIN <= set(entries)
    assert available_options("method") == learner_names() == sorted(entries)
    for name in BUILTIN:
        module = "aper" if name in APER else name
        assert entries[name].builtin and entries[name].target.startswith(f"pilot.learners.{module}.")
        assert issubclass(get_learner(name), Learner)


def test_every_registered_learner_has_a_method_config_naming_its_class():
    """``+method=NAME`` composes ``method/NAME.yaml``, whose ``_target_`` is the registered class; and
    every method file on the search path belongs to a registered learner."""
    for name, entry in learners().items():
        assert compose_config([f"+method={name}"]).method._target_ == entry.target
    files = {p.stem for root in config_roots() for p in (root / "method").glob("*.yaml")}
    assert files == set(learner_names())


def test_listing_learners_imports_neither_torch_nor_the_learners():
    code = (
        "import sys; from pilot.config import available_options; names = available_options('method'); "
        "assert not any(m in sys.modules for m in ('torch', 'pilot.learners.base')), sorted(sys.modules); print(names)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in BUILTIN)


def test_the_decorator_registers_a_learner_and_refuses_a_second_class_under_its_name(decorated):
    @register_learner("registry_test_a")
    class First(SimpleLearner):
        pass

    assert "registry_test_a" in learner_names() and get_learner("registry_test_a") is First
    with pytest.raises(RegistryError, match=r"'registry_test_a' is registered twice: by .*First .* and by .*Second"):

        @register_learner("registry_test_a")
        class Second(SimpleLearner):
            pass

    with pytest.raises(
        RegistryError, match=r"'simplecil' is registered twice: by pilot\.learners\.simplecil\.SimpleCIL"
    ):

        @register_learner("simplecil")
        class Impostor(SimpleLearner):
            pass

    assert get_learner("registry_test_a") is First and learners()["simplecil"].builtin


def test_the_decorator_refuses_bad_names_and_classes_that_are_not_learners(decorated):
    with pytest.raises(RegistryError, match="lower case"):
        register_learner("Not-A-Name")
    with pytest.raises(RegistryError, match="not a subclass of pilot.learners.base.Learner"):

        @register_learner("registry_test_b")
        class NotALearner:
            pass

    assert "registry_test_b" not in learner_names()


def test_a_plugin_name_that_clashes_with_a_builtin_is_refused_naming_both(tmp_path, monkeypatch):
    fake = fake_distribution(tmp_path, "clashing-plugin", "[pilot.learners]\ncoda = clashing.learner:Coda\n")
    monkeypatch.syspath_prepend(str(fake))
    message = (
        r"'coda' is registered twice: by pilot\.learners\.coda\.CodaPrompt \(built in\) "
        r"and by clashing\.learner\.Coda \(package clashing-plugin\)"
    )
    with pytest.raises(RegistryError, match=message):
        learners()
    with pytest.raises(RegistryError, match=message):  # a run stops at validation, before anything is built
        validate_config(compose_config(FAST + ["+method=simplecil"]))


def test_a_plugin_config_entry_point_that_is_not_a_package_is_named(tmp_path, monkeypatch):
    fake = fake_distribution(tmp_path, "broken-plugin", "[pilot.configs]\nbroken = no_such_package.configs\n")
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(
        RegistryError, match=r"pilot.configs broken = 'no_such_package.configs' of package broken-plugin"
    ):
        registry.check_registry()


@pytest.mark.parametrize("name", learner_names())
def test_every_registered_learner_runs_two_sessions_and_resumes_identically(name, tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides(name), tmp_path)


# ------------------------------------------------------------------------------- the example plugin
@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """The example plugin, visible through its entry points (see the module docstring)."""
    metadata = tmp_path_factory.mktemp("plugin_metadata")
    code = (
        "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(metadata)], cwd=PLUGIN_DIR, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for egg_info in metadata.glob("*.egg-info"):  # setuptools' intermediate copy of the same metadata
        shutil.rmtree(egg_info)
    paths = [str(metadata), str(PLUGIN_DIR / "src")]
    with pytest.MonkeyPatch.context() as patch:
        for path in reversed(paths):
            patch.syspath_prepend(path)
        yield paths
    for module in [m for m in sys.modules if m == "pilot_example_plugin" or m.startswith("pilot_example_plugin.")]:
        del sys.modules[module]
    importlib.invalidate_caches()


def test_the_example_plugin_adds_its_learner_and_config(example_plugin):
    entry = learners()[PLUGIN_METHOD]
    assert entry.target == "pilot_example_plugin.learner.RanPACMini" and "pilot-example-plugin" in entry.origin
    assert PLUGIN_METHOD in available_options("method")
    assert issubclass(get_learner(PLUGIN_METHOD), Learner)
    cfg = compose_config(FAST + [f"+method={PLUGIN_METHOD}"])
    assert OmegaConf.to_container(cfg.method)["_target_"] == entry.target
    assert cfg.labels.method == PLUGIN_METHOD
    # A whole method in one short file.
    assert len((PLUGIN_DIR / "src/pilot_example_plugin/learner.py").read_text().splitlines()) < 100


def test_the_example_plugin_config_is_validated_from_its_annotations(example_plugin):
    validate_config(compose_config(FAST + [f"+method={PLUGIN_METHOD}"]))
    with pytest.raises(ConfigError, match=r"method\.ridge=0 is not allowed: it must be a number > 0"):
        validate_config(compose_config(FAST + [f"+method={PLUGIN_METHOD}", "method.ridge=0"]))


def test_builtin_configs_compose_as_before_with_a_plugin_installed(example_plugin):
    overrides = ["+method=coda", "dataset=imagenet_r"]
    with_plugin = OmegaConf.to_container(compose_config(overrides), resolve=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "path", [p for p in sys.path if p not in example_plugin])
        assert PLUGIN_METHOD not in learner_names()
        without = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert with_plugin == without


def test_the_example_plugin_runs_two_sessions_and_resumes_identically(example_plugin, tmp_path, fast):
    assert_resumes_identically(fast + TWO_SESSIONS + small_overrides(PLUGIN_METHOD), tmp_path)


def test_the_command_line_finds_the_example_plugin(example_plugin, tmp_path):
    """``python -m pilot.train`` (``@hydra.main``) lists the plugin and composes and checks its config
    (a value out of range is answered before torch loads, so this takes seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*example_plugin, str(ROOT)]), "HYDRA_FULL_ERROR": "0"}

    def pilot_train(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pilot.train", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert PLUGIN_METHOD in pilot_train("--help").stdout.splitlines()[1]
    bad = pilot_train(f"+method={PLUGIN_METHOD}", "method.ridge=0", "logger=csv")
    assert bad.returncode == 2
    assert "method.ridge=0 is not allowed: it must be a number > 0" in bad.stderr


class SimpleLearner(Learner):
    """A learner for the decorator tests (never run)."""

    def predict(self, batch):  # pragma: no cover - never called
        raise NotImplementedError
