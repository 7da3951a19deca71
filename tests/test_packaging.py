"""Packaging without building anything: what setuptools would put in the wheel, where the configs and
published numbers are found, the console scripts, and the entry point's fast answers (``--help``,
a configuration error) as a user sees them. CI builds and installs the real wheel (.ci/packaging)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from pilot.config import CONFIG_DIR
from pilot.resources import shipped_dir
from pilot.tables.published import DEFAULT_PUBLISHED

ROOT = Path(__file__).resolve().parent.parent
# `python -m pilot.train --help` took 1.2-2.5 s on the shared 2-core machine (torch is not imported): about 3x that;
# importing the run loop (torch, timm) took about 9 s there, so the bound fails if torch creeps into the path.
HELP_SECONDS = 8


def _pilot_train(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pilot.train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _git_files(folder: str) -> set[str]:
    """Files under ``folder`` that git tracks, or (outside a git checkout) all files there."""
    try:
        out = subprocess.run(
            ["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout
        files = set(out.split())
    except (OSError, subprocess.CalledProcessError):
        files = set()
    if not files:
        files = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
    return {f for f in files if (ROOT / f).exists()}


@pytest.fixture(scope="module")
def build_py():
    """setuptools' ``build_py`` command configured from pyproject.toml, as a wheel build sets it up."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} cannot read this pyproject.toml (>=77 needed)")
    cwd = os.getcwd()
    os.chdir(ROOT)  # setuptools works with paths relative to the project root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist = apply_configuration(setuptools.Distribution(), ROOT / "pyproject.toml")
            command = dist.get_command_obj("build_py")
            command.ensure_finalized()
            data_files = command.data_files
    finally:
        os.chdir(cwd)
    return dist, data_files


def _shipped(data_files, package: str) -> set[str]:
    """Files (relative to the repository root) that the wheel carries as data of ``package``."""
    return {(Path(src) / name).as_posix() for pkg, src, _build, names in data_files if pkg == package for name in names}


def test_config_dir_is_the_checkouts_configs_here():
    assert (CONFIG_DIR / "train.yaml").is_file()
    assert CONFIG_DIR == ROOT / "configs"  # tests run on the checkout (editable install or PYTHONPATH)
    assert DEFAULT_PUBLISHED == ROOT / "results" / "published.csv" and DEFAULT_PUBLISHED.is_file()


def test_the_packaged_copy_wins_over_a_checkout_folder(tmp_path, monkeypatch):
    import pilot.resources

    package = tmp_path / "site-packages" / "pilot"
    (package / "configs").mkdir(parents=True)
    (package / "configs" / "train.yaml").write_text("")
    (tmp_path / "site-packages" / "configs").mkdir()  # some other distribution's top-level folder
    monkeypatch.setattr(pilot.resources, "PACKAGE_DIR", package)
    assert shipped_dir("configs", "train.yaml") == package / "configs"
    assert shipped_dir("results", "published.csv") == package.parent / "results"  # neither has it


def test_every_config_file_and_the_published_numbers_ship_in_the_wheel(build_py):
    dist, data_files = build_py
    assert dist.package_dir["pilot.configs"] == "configs" and dist.package_dir["pilot.results"] == "results"
    tracked = _git_files("configs")
    assert "configs/train.yaml" in tracked and len(tracked) > 40
    assert _shipped(data_files, "pilot.configs") == tracked
    assert _shipped(data_files, "pilot.results") == {"results/published.csv"}
    assert _shipped(data_files, "pilot.data.embedded") >= {
        "pilot/data/embedded/fashion_mnist_subset.npz",
        "pilot/data/embedded/FASHION_MNIST_NOTICE.txt",
    }


def test_every_folder_of_pilot_is_a_listed_package(build_py):
    dist, _ = build_py
    folders = {
        ".".join(p.relative_to(ROOT).parts)
        for p in [ROOT / "pilot", *(ROOT / "pilot").rglob("*")]
        if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())
    }
    missing = folders - set(dist.packages)
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_console_scripts_point_at_callables(build_py):
    dist, _ = build_py
    scripts = dict(line.replace(" ", "").split("=") for line in dist.entry_points["console_scripts"])
    assert set(scripts) == {"pilot-train", "pilot-tables", "pilot-data", "pilot-pack"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_help_is_fast_and_says_how_to_choose_a_method(tmp_path):
    start = time.perf_counter()
    proc = _pilot_train("--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "pilot-train +method=NAME" in proc.stdout and "== Configuration groups ==" in proc.stdout
    assert elapsed < HELP_SECONDS


def test_a_config_error_is_one_line_on_stderr_with_status_2(tmp_path):
    args = ("logger=csv", f"paths.results_dir={tmp_path}")  # no +method: refused before torch loads
    proc = _pilot_train(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ConfigError: No method chosen"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    log_file = next((tmp_path / "runs").rglob("train.log"))
    assert "ConfigError: No method chosen" in log_file.read_text()

    proc = _pilot_train(*args, cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("ConfigError: ")
