"""Experiment presets (configs/experiment/): composed after the method, every value they set is the
resolved value, ``for_method`` applies to its method only, and the command line wins over both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_config
from omegaconf import OmegaConf

from pilot.config import CONFIG_DIR, _leaf_paths, available_options, command_line_keys
from pilot.registry import builtin_learners

PRESETS = available_options("experiment")
METHODS = available_options("method")
# Hydra's defaults-list groups whose choice a preset can override, and where the choice shows.
GROUP_LABELS = {"dataset": "dataset", "backbone": "backbone"}


def preset_yaml(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()) or {}


def expected_values(preset: dict, method: str) -> dict[str, object]:
    """Leaf values the preset pins for ``method``: its own keys, then ``for_method[method]`` on top."""
    own = {k: v for k, v in preset.items() if k not in ("defaults", "for_method")}
    values = dict(_leaf_paths(own))
    values.update(_leaf_paths((preset.get("for_method") or {}).get(method) or {}))
    return {k: v for k, v in values.items() if k}


def resolved(cfg, path: str):
    value = OmegaConf.select(cfg, path)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_value_a_preset_sets_is_the_resolved_value(preset, method):
    spec = preset_yaml(preset)
    cfg = compose_config([f"+method={method}", f"experiment={preset}"])
    values = expected_values(spec, method)
    for path, value in values.items():
        assert resolved(cfg, path) == value, f"{preset} + {method}: {path}"
    for entry in spec.get("defaults", []):
        (key, option), *_ = entry.items()
        group = key.removeprefix("override /")
        if group in GROUP_LABELS:
            assert cfg.labels[GROUP_LABELS[group]] == option, f"{preset}: {group}"
        elif group == "scenario":
            scenario = yaml.safe_load((CONFIG_DIR / "scenario" / f"{option}.yaml").read_text())
            for key in ("init_cls", "increment"):
                if key not in values.keys() | {f"scenario.{k}" for k in values}:
                    assert cfg.scenario[key] == scenario[key], f"{preset}: scenario.{key}"
    assert "for_method" not in cfg  # merged, then removed: learners and hashes never see it


def test_pilot_reference_sets_each_methods_reference_switches():
    settings = {m: compose_config([f"+method={m}", "experiment=pilot_reference", "dataset=cifar100"]) for m in METHODS}
    assert settings["dualprompt"].method.reference_prefix_layout is True
    assert settings["slca"].method.reference_session_mapping is True
    assert (settings["coda"].seed, settings["coda"].scenario.class_order) == (0, "natural")
    for m in set(METHODS) - {"coda"}:
        assert (settings[m].seed, settings[m].scenario.class_order) == (1993, "shuffle"), m
    for cfg in settings.values():
        assert (cfg.labels.backbone, cfg.runtime.precision, cfg.runtime.tf32) == ("vit_b16_in1k", "fp32", False)
    # Method keys of one learner never leak into another (validation would refuse them).
    assert "reference_prefix_layout" not in settings["l2p"].method
    assert "reference_session_mapping" not in settings["dualprompt"].method


def test_without_the_preset_the_defaults_stay_the_papers_and_the_common_order():
    dual = compose_config(["+method=dualprompt"])
    slca = compose_config(["+method=slca"])
    coda = compose_config(["+method=coda", "dataset=imagenet_r"])
    assert dual.method.reference_prefix_layout is False
    assert slca.method.reference_session_mapping is False
    assert (coda.seed, coda.scenario.class_order, coda.method.epochs, coda.labels.dataset) == (
        1993,
        "shuffle",
        50,
        "imagenet_r",
    )
    assert (coda.runtime.precision, coda.labels.backbone) == ("bf16", "vit_b16_in1k")


@pytest.mark.parametrize(
    ("overrides", "path", "value"),
    [
        (["method.reference_prefix_layout=false"], "method.reference_prefix_layout", False),
        (["seed=1994"], "seed", 1994),
        (["scenario.class_order=shuffle"], "scenario.class_order", "shuffle"),
        (["runtime.precision=bf16"], "runtime.precision", "bf16"),
        (["backbone=vit_test_tiny"], "labels.backbone", "vit_test_tiny"),
    ],
)
def test_the_command_line_wins_over_the_preset(overrides, path, value):
    method = "coda" if path.startswith("s") else "dualprompt"
    cfg = compose_config([f"+method={method}", "experiment=pilot_reference", *overrides])
    assert OmegaConf.select(cfg, path) == value


def test_a_preset_can_set_method_values(tmp_path):
    """A user's preset on the search path sets method.* values; they override the method file."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "short.yaml").write_text(
        "# @package _global_\nmethod:\n  epochs: 1\n  pull_coeff: 0.5\nseed: 7\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose_config(["+method=l2p", "experiment=short", search])
    assert (cfg.method.epochs, cfg.method.pull_coeff, cfg.seed) == (1, 0.5, 7)
    cfg = compose_config(["+method=l2p", "experiment=short", "method.epochs=3", search])
    assert (cfg.method.epochs, cfg.method.pull_coeff) == (3, 0.5)


def test_command_line_keys_leave_out_group_choices():
    keys = command_line_keys(["+method=coda", "dataset=cifar100", "seed=3", "++method.epochs=1", "~method.x", "a.b=2"])
    assert keys == {"seed", "method.epochs", "method.x", "a.b"}


def test_a_preset_without_a_method_says_that_a_method_is_missing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pilot.train", "experiment=quickstart"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    builtin = ", ".join(sorted(builtin_learners()))  # the child process sees no plugin
    assert f"No method chosen. Add +method=NAME, one of: {builtin}\n" in proc.stderr
