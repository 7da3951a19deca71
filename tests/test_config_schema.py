"""Typed configuration (pilot/schema.py): bad values are refused right after composition, with the key,
the value and what is allowed; every shipped config passes; defaults live in one place."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import get_object
from omegaconf import OmegaConf

from pilot import schema
from pilot.api import make_learner
from pilot.config import INJECTED_ARGS, available_options, validate_config
from pilot.errors import ConfigError
from pilot.learners.base import INFERENCE_KEYS, TRAINING_KEYS, Learner, build_learner

REPO = Path(__file__).resolve().parent.parent


def validated(overrides: list[str]):
    cfg = compose_config(overrides)
    validate_config(cfg)
    return cfg


# ------------------------------------------------------------------------------- bad values
# (overrides, the key the message must name, the value as the message must show it)
BAD = [
    # method: every learner's own keys, and the optimizer / scheduler nodes nested in it
    (["+method=l2p", "method.epochs=0"], "method.epochs", "0"),
    (["+method=slca", "method.epochs=-1"], "method.epochs", "-1"),
    (["+method=ease", "method.epochs=abc"], "method.epochs", "abc"),
    (["+method=coda", "method.epochs=2.5"], "method.epochs", "2.5"),
    (["+method=l2p", "method.optimizer.lr=fast"], "method.optimizer.lr", "fast"),
    (["+method=dualprompt", "method.optimizer.lr=0"], "method.optimizer.lr", "0"),
    (["+method=ease", "method.optimizer.lr=-0.1"], "method.optimizer.lr", "-0.1"),
    (["+method=simplecil", "method.batch_size=big"], "method.batch_size", "big"),
    (["+method=coda", "method.batch_size=0"], "method.batch_size", "0"),
    (["+method=l2p", "method.batch_size=-16"], "method.batch_size", "-16"),
    (["+method=simplecil", "method.eval_batch_size=0"], "method.eval_batch_size", "0"),
    (["+method=dualprompt", "method.optimizer.betas=[0.9,1.5]"], "method.optimizer.betas", "[0.9,1.5]"),
    (["+method=l2p", "method.optimizer.betas=[0.9]"], "method.optimizer.betas", "[0.9]"),
    (["+method=slca", "method.optimizer.weight_decay=-1"], "method.optimizer.weight_decay", "-1"),
    (["+method=ease", "method.optimizer.momentum=-0.5"], "method.optimizer.momentum", "-0.5"),
    (["+method=slca", "method.scheduler.milestones=[ten]"], "method.scheduler.milestones", "[ten]"),
    (["+method=slca", "method.scheduler.gamma=0"], "method.scheduler.gamma", "0"),
    (["+method=ease", "method.scheduler.T_max=-1"], "method.scheduler.T_max", "-1"),
    (["+method=ease", "method.scheduler.eta_min=-0.1"], "method.scheduler.eta_min", "-0.1"),
    (["+method=coda", "method.scheduler.epochs=0"], "method.scheduler.epochs", "0"),
    (["+method=slca", "method.ca_epochs=-1"], "method.ca_epochs", "-1"),
    (["+method=slca", "method.ca_logit_norm=0"], "method.ca_logit_norm", "0"),
    (["+method=slca", "method.ca_scheduler=cosine"], "method.ca_scheduler", "cosine"),
    (["+method=l2p", "method.top_k=0"], "method.top_k", "0"),
    (["+method=dualprompt", "method.pool_size=0"], "method.pool_size", "0"),
    (["+method=l2p", "method.pull_coeff=abc"], "method.pull_coeff", "abc"),
    (["+method=dualprompt", "method.e_prompt_layers=[two]"], "method.e_prompt_layers", "[two]"),
    (["+method=coda", "method.prompt_length=7"], "method.prompt_length", "7"),
    (["+method=coda", "method.prompt_layers=[-1]"], "method.prompt_layers", "[-1]"),
    (["+method=coda", "method.drop_last=maybe"], "method.drop_last", "maybe"),
    (["+method=ease", "method.adapter_dropout=1.5"], "method.adapter_dropout", "1.5"),
    (["+method=ease", "method.sets_per_pass=0"], "method.sets_per_pass", "0"),
    (["+method=l2p", "method.optimizer=adam"], "method.optimizer", "adam"),
    # runtime
    (["+method=simplecil", "runtime.device=gpu"], "runtime.device", "gpu"),
    (["+method=simplecil", "runtime.device=cuda:x"], "runtime.device", "cuda:x"),
    (["+method=simplecil", "runtime.precision=fp16"], "runtime.precision", "fp16"),
    (["+method=simplecil", "runtime.num_workers=-1"], "runtime.num_workers", "-1"),
    (["+method=simplecil", "runtime.tf32=yes"], "runtime.tf32", "yes"),
    (["+method=simplecil", "runtime.cpu_threads=0"], "runtime.cpu_threads", "0"),
    (["+method=simplecil", "runtime.cpu_inference_chunk=-8"], "runtime.cpu_inference_chunk", "-8"),
    # scenario
    (["+method=simplecil", "scenario.init_cls=0"], "scenario.init_cls", "0"),
    (["+method=simplecil", "scenario.increment=-5"], "scenario.increment", "-5"),
    (["+method=simplecil", "scenario.class_order=random"], "scenario.class_order", "random"),
    (["+method=simplecil", "scenario.class_order=[0,1,-2]"], "scenario.class_order", "[0,1,-2]"),
    (["+method=simplecil", "scenario.order_seed=x"], "scenario.order_seed", "x"),
    # top level: seed, resume, debug, paths
    (["+method=simplecil", "seed=abc"], "seed", "abc"),
    (["+method=simplecil", "seed=-1"], "seed", "-1"),
    (["+method=simplecil", "resume=maybe"], "resume", "maybe"),
    (["+method=simplecil", "debug.stop_after_session=-1"], "debug.stop_after_session", "-1"),
    (["+method=simplecil", "paths.results_dir=''"], "paths.results_dir", "''"),
    # backbone
    (["+method=simplecil", "backbone.input_size=0"], "backbone.input_size", "0"),
    (["+method=simplecil", "backbone.pretrained=sometimes"], "backbone.pretrained", "sometimes"),
    (["+method=simplecil", "backbone.mean=[0.5,0.5]"], "backbone.mean", "[0.5,0.5]"),
    (["+method=simplecil", "backbone.std=[0,0,0]"], "backbone.std", "[0,0,0]"),
    (["+method=simplecil", "backbone=efficientnet_lite0", "backbone.input_size=-224"], "backbone.input_size", "-224"),
    # transforms
    (["+method=simplecil", "transforms.hflip_prob=2"], "transforms.hflip_prob", "2"),
    (["+method=simplecil", "transforms.train_scale=[0.9,0.1]"], "transforms.train_scale", "[0.9,0.1]"),
    (["+method=simplecil", "transforms.train_ratio=[0.75]"], "transforms.train_ratio", "[0.75]"),
    (["+method=simplecil", "transforms.test_crop_pct=0"], "transforms.test_crop_pct", "0"),
    (["+method=coda", "transforms.test_interpolation=nearest"], "transforms.test_interpolation", "nearest"),
    # logger sinks
    (["+method=simplecil", "logger.wandb.mode=maybe"], "logger.wandb.mode", "maybe"),
    (["+method=simplecil", "logger.csv.float_format=3"], "logger.csv.float_format", "3"),
    # dataset
    (["+method=simplecil", "dataset=synthetic", "dataset.num_classes=1"], "dataset.num_classes", "1"),
    (["+method=simplecil", "dataset=synthetic", "dataset.noise=-1"], "dataset.noise", "-1"),
    (["+method=simplecil", "dataset=synthetic", "dataset.train_per_class=0"], "dataset.train_per_class", "0"),
    (["+method=simplecil", "dataset=fashion_mnist", "dataset.variant=tiny"], "dataset.variant", "tiny"),
    (["+method=simplecil", "dataset.download=perhaps"], "dataset.download", "perhaps"),
    (["+method=simplecil", "dataset=image_folder", "dataset.root=''"], "dataset.root", "''"),
]


@pytest.mark.parametrize("overrides, key, shown", BAD, ids=[" ".join(o[1:]) for o, _, _ in BAD])
def test_bad_value_is_refused_with_key_value_and_what_is_allowed(overrides, key, shown):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(f"{key}={shown} is not allowed: it must be "), message
    assert "\n" not in message and message.endswith(".")


def test_message_gives_the_range_and_an_example():
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["+method=l2p", "method.epochs=0"]))
    assert str(err.value) == "method.epochs=0 is not allowed: it must be an integer >= 1 (e.g. method.epochs=1)."
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["+method=simplecil", "runtime.precision=fp16"]))
    assert str(err.value) == "runtime.precision=fp16 is not allowed: it must be one of bf16, fp32."
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["+method=simplecil", "transforms.train_scale=[0.9,0.1]"]))
    assert "a list of 2 numbers > 0 and <= 1, in increasing order (e.g. transforms.train_scale=[0.05,1.0])" in str(
        err.value
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a typo in a nested torch node: the stand-in does not list it, so the real signature decides
        (["+method=l2p", "+method.optimizer.lrr=0.1"], "method.optimizer.lrr is not a parameter of torch.optim.Adam"),
        (["+method=l2p", "method.optimizer._target_=torch.optim.Adamm"], "method.optimizer._target_=torch.optim.Adamm"),
        (["+method=simplecil", "+method.setup=x"], "method.setup is passed by the run itself"),
        (["+method=slca", "~method.scheduler.milestones", "method.scheduler._partial_=false"], "milestones is not set"),
    ],
)
def test_keys_and_targets(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(compose_config(overrides))


def test_a_real_torch_parameter_outside_the_stand_in_is_accepted():
    validated(["+method=l2p", "+method.optimizer.maximize=false"])


# ------------------------------------------------------------------------------- good values
METHODS = available_options("method")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", ["cifar100", "imagenet_r"])
def test_every_method_config_validates(method, dataset):
    validated([f"+method={method}", f"dataset={dataset}"])


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("dataset", "backbone", "scenario", "transforms", "logger") for o in available_options(g)],
)
def test_every_group_option_validates(group, option):
    extra = ["dataset.root=/somewhere"] if option == "image_folder" else []
    validated(["+method=simplecil", f"{group}={option}"] + extra)


@pytest.mark.parametrize("experiment", available_options("experiment"))
def test_every_experiment_validates(experiment):
    methods = METHODS if experiment == "pilot_reference" else ["l2p"]  # the preset with per-method values
    for method in methods:
        validated([f"+method={method}", f"experiment={experiment}"])


@pytest.mark.parametrize(
    "override",
    ["runtime.device=cuda:1", "runtime.device=cpu", "scenario.class_order=[2,1,0]", "scenario.class_order=natural"]
    + ["method.optimizer.lr=1", "backbone.mean=[0.5]", "backbone.std=null", "runtime.cpu_threads=null", "seed=0"],
)
def test_good_values_pass(override):
    validated(["+method=l2p", override])


def test_slca_without_classifier_alignment_validates():
    validated(["+method=slca", "method.ca_epochs=0"])  # its ca_scheduler gets T_max=${method.ca_epochs}=0


# ------------------------------------------------------------------------ one source of truth
def _parameters(fn) -> dict[str, schema.Param]:
    """A callable's parameters, from the imported object; for a class those of ``__init__`` (learners have
    a metaclass ``__call__``) with those it forwards to its base class by ``**kwargs``."""
    return schema._signature_of_callable(fn).params


def _as_config(value):
    """A Python default as the YAML would write it: a ``partial`` becomes a ``_partial_`` node."""
    if isinstance(value, partial):
        return {"_target_": value.func, "_partial_": True, **{k: _as_config(v) for k, v in value.keywords.items()}}
    if isinstance(value, (tuple, list)):
        return [_as_config(v) for v in value]
    return value


def _yaml_node(node):
    if isinstance(node, dict):
        out = {k: _yaml_node(v) for k, v in node.items()}
        if "_target_" in out:
            out["_target_"] = get_object(out["_target_"])
        return out
    return node


@pytest.mark.parametrize("group, option", [("method", m) for m in METHODS] + [("runtime", "default")])
def test_python_defaults_equal_the_yaml_for_cifar100(group, option):
    """The YAML is the one place a default is set; the Python defaults (for direct calls, e.g. in tests)
    must say the same for CIFAR-100, the dataset they are written for, and the YAML lists every parameter.
    The training-loop settings (:class:`Training`) have no per-learner Python default: the YAML sets them."""
    method = option if group == "method" else "simplecil"
    node = OmegaConf.to_container(compose_config([f"+method={method}", "dataset=cifar100"])[group], resolve=True)
    parameters = _parameters(get_object(node["_target_"]))
    for name, parameter in parameters.items():
        if name in INJECTED_ARGS.get(group, ()) or (group == "method" and name in TRAINING_KEYS):
            continue
        assert name in node, f"configs/{group}/{option}.yaml does not set {name}"
        if parameter.default is not inspect.Parameter.empty:
            assert _as_config(parameter.default) == _yaml_node(node[name]), f"{group}.{name}: Python and YAML differ"


@pytest.mark.parametrize("method", METHODS)
def test_the_yaml_sets_the_training_settings_a_learner_uses(method):
    """A learner that trains gets its optimiser, epochs and batch sizes from its YAML; one that does not
    (SimpleCIL) sets only the batch sizes, and an optimiser there would be an unused setting."""
    node = OmegaConf.to_container(compose_config([f"+method={method}", "dataset=cifar100"]).method, resolve=True)
    cls = get_object(node["_target_"])
    trains = cls.train_session is not Learner.train_session
    expected = TRAINING_KEYS if trains else INFERENCE_KEYS
    assert expected <= set(node), f"configs/method/{method}.yaml lacks {sorted(expected - set(node))}"
    assert trains or not ({"optimizer", "scheduler", "epochs"} & set(node))


def test_a_learner_that_trains_refuses_a_missing_optimizer():
    backbone, scenario, runtime, _ = _tiny_parts()
    cfg = validated(["+method=l2p", "method.optimizer=null"])  # null is a valid value for the schema...
    with pytest.raises(ConfigError, match=r"method\.optimizer is not set, but L2P trains"):
        build_learner(cfg.method, backbone, scenario, runtime)  # ...the learner refuses it before it is built
    sgd = "{_target_: torch.optim.SGD, _partial_: true, lr: 0.1}"
    with pytest.raises(ConfigError, match=r"method\.optimizer is not a parameter of .*SimpleCIL"):
        validated(["+method=simplecil", f"+method.optimizer={sgd}"])  # setup: InferenceSetup takes batch sizes only
    with pytest.raises(ConfigError, match=r"SimpleCIL does not train.*remove method\.optimizer"):
        make_learner("simplecil", backbone, scenario, runtime, optimizer=partial(torch.optim.SGD, lr=0.1))


def test_slca_and_ease_defaults_are_the_yaml_schedules():
    from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

    slca = OmegaConf.to_container(compose_config(["+method=slca", "dataset=cifar100"]).method)
    ease = OmegaConf.to_container(compose_config(["+method=ease", "dataset=cifar100"]).method)
    assert get_object(slca["scheduler"]["_target_"]) is MultiStepLR
    assert get_object(slca["ca_scheduler"]["_target_"]) is CosineAnnealingLR
    assert get_object(ease["scheduler"]["_target_"]) is CosineAnnealingLR


def _tiny_parts(num_classes: int = 4):
    from pilot.backbones.factory import create_timm_backbone
    from pilot.data.datasets import synthetic
    from pilot.data.pipeline import DataPipeline
    from pilot.data.scenario import make_scenario
    from pilot.data.transforms import ImageTransforms
    from pilot.runtime import make_runtime

    torch.manual_seed(0)
    backbone = create_timm_backbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        input_size=32,
        model_kwargs=dict(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2),
    )
    runtime = make_runtime(device="cpu", progress=False, channels_last=False)
    scenario = make_scenario(num_classes, 2, 2)
    data = synthetic(num_classes=num_classes, train_per_class=4, test_per_class=2)
    return backbone, scenario, runtime, DataPipeline(data, scenario, ImageTransforms(32), runtime)


@pytest.mark.parametrize("scheduler, constant", [("null", True), ("[1]", False)])
def test_slca_scheduler_null_keeps_the_learning_rate_constant(monkeypatch, scheduler, constant):
    from pilot.learners import slca as slca_module

    overrides = ["+method=slca", "method.epochs=3", "method.batch_size=8", "method.ca_epochs=0"]
    overrides.append("method.scheduler=null" if scheduler == "null" else f"method.scheduler.milestones={scheduler}")
    cfg = validated(overrides)
    backbone, scenario, runtime, pipeline = _tiny_parts()
    learner = build_learner(cfg.method, backbone, scenario, runtime)
    assert (learner.scheduler is None) == constant

    lrs = []
    original = slca_module.train_epochs

    def recording(batches, epochs, loss_fn, optimizer, *args, **kwargs):
        optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(tuple(g["lr"] for g in opt.param_groups)))
        return original(batches, epochs, loss_fn, optimizer, *args, **kwargs)

    monkeypatch.setattr(slca_module, "train_epochs", recording)
    learner.train()
    learner.fit(pipeline.session(scenario.sessions[0]))
    assert len(lrs) == 3 and lrs[0] == pytest.approx((1e-4, 1e-2))
    assert (len(set(lrs)) == 1) == constant  # milestones=[1]: the lr drops after the first epoch


def test_ease_scheduler_null_is_no_scheduler():
    cfg = validated(["+method=ease", "method.scheduler=null"])
    assert OmegaConf.to_container(cfg.method)["scheduler"] is None
    backbone, scenario, runtime, _ = _tiny_parts()
    assert build_learner(cfg.method, backbone, scenario, runtime).scheduler is None


# ---------------------------------------------------------------------- how signatures are read
def _config_targets() -> dict[str, str]:
    """Every ``_target_`` the shipped configs name, with the path of one node that names it."""
    found: dict[str, str] = {}

    def walk(path, node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.setdefault(node["_target_"], path)
            for key, value in node.items():
                walk(f"{path}.{key}" if path else key, value)

    for method in METHODS:
        walk("", OmegaConf.to_container(compose_config([f"+method={method}", "experiment=quickstart"]), resolve=True))
    for group in ("dataset", "backbone", "transforms", "logger"):
        for option in available_options(group):
            extra = ["dataset.root=/x"] if option == "image_folder" else []
            cfg = compose_config(["+method=simplecil", f"{group}={option}"] + extra)
            walk(group, OmegaConf.to_container(cfg[group], resolve=True))
    return found


TARGETS = _config_targets()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_settable_parameter_is_annotated(target):
    """A new parameter without an annotation would go unchecked: annotate it (see pilot/schema.py)."""
    injected = INJECTED_ARGS.get(TARGETS[target], set())
    stand_in = schema.STAND_INS.get(target)
    signature = schema._signature_of_callable(stand_in) if stand_in else schema.signature_of(target)
    for name, param in signature.params.items():
        if name not in injected:
            assert param.type is not typing.Any, f"{target}: parameter {name} has no annotation"
            if not schema.takes_objects(param.type):
                schema._adapter(param.type)  # pydantic can check it (is_valid lets through what it cannot)


@pytest.mark.parametrize("target", sorted(t for t in TARGETS if t not in schema.STAND_INS))
def test_reading_the_source_gives_the_imported_signature(target):
    from_source = schema._signature_from_source(target)
    assert from_source is not None, f"{target} could not be read from its source"
    imported = schema._signature_of_callable(get_object(target))
    assert list(from_source.params) == list(imported.params) and from_source.open == imported.open
    for name, param in from_source.params.items():
        real = imported.params[name]
        assert schema.takes_objects(param.type) == schema.takes_objects(real.type), name
        if not schema.takes_objects(real.type):
            assert param.type == real.type, name
        if param.default is not schema.UNKNOWN:
            assert param.default == real.default, name


_FORWARDING = {
    "forwarding_base.py": """
from pilot.schema import PositiveInt


class Base:
    def __init__(self, backbone: object, *, kind: str, epochs: PositiveInt = 5, lr: float = 0.1) -> None:
        pass
""",
    "forwarding_child.py": """
from typing import Any

from forwarding_base import Base
from pilot.schema import PositiveInt


class Child(Base):
    def __init__(self, backbone: object, *, width: PositiveInt = 3, epochs: PositiveInt = 7, **base: Any) -> None:
        super().__init__(backbone, kind="fixed", **base)


class Grandchild(Child):
    pass


class Open(Base):
    def __init__(self, backbone: object, **options: Any) -> None:  # not forwarded: any key goes
        super().__init__(backbone, kind="open")
""",
}


def test_kwargs_forwarded_to_the_base_class_bring_its_parameters(tmp_path, monkeypatch):
    """``**base`` passed on to ``super().__init__`` adds the base class's parameters, less those the call
    sets itself (by position or keyword) and those the subclass redefines (its default wins); a class
    without ``__init__`` has its base's. Read from the source and from the imported class alike."""
    for name, text in _FORWARDING.items():
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("forwarding_child.Child", "forwarding_child.Grandchild"):
        for signature in (schema._signature_from_source(target), schema._signature_of_callable(get_object(target))):
            assert signature is not None and not signature.open
            assert list(signature.params) == ["backbone", "width", "epochs", "lr"]
            assert signature.params["epochs"].default == 7 and signature.params["lr"].default == 0.1
            assert schema.describe(signature.params["width"].type) == "an integer >= 1"
    with pytest.raises(ConfigError, match="method.kind is not a parameter"):
        schema.check_node("method", {"_target_": "forwarding_child.Child", "kind": "other"}, {"backbone"})
    opened = schema._signature_from_source("forwarding_child.Open")
    assert opened is not None and opened.open and list(opened.params) == ["backbone"]


@pytest.mark.parametrize("target", sorted(schema.STAND_INS))
def test_stand_ins_match_the_real_signatures(target):
    """A stand-in uses the target's own parameter names and defaults; for our own classes it lists them all."""
    stand_in = inspect.signature(schema.STAND_INS[target]).parameters
    real = _parameters(get_object(target))
    for name, param in stand_in.items():
        assert name in real, f"{target} has no parameter {name}"
        if real[name].default is not inspect.Parameter.empty:
            assert _as_config(param.default) == _as_config(real[name].default), f"{target}.{name}"
    if target.startswith("pilot."):
        assert set(stand_in) == set(real), f"the stand-in of {target} does not list every parameter"


# ------------------------------------------------------------------------------------- speed
def test_validation_answers_without_importing_torch():
    code = (
        "import sys, pilot.train\n"
        "from pilot.config import compose_config, validate_config\n"
        "from pilot.errors import ConfigError\n"
        "for extra in (['method.epochs=0'], ['method.optimizer.lr=fast'], []):\n"
        "    try:\n"
        "        validate_config(compose_config(['+method=l2p', 'dataset=imagenet_r'] + extra))\n"
        "    except ConfigError:\n"
        "        pass\n"
        "    else:\n"
        "        assert not extra\n"
        "print('torch' in sys.modules, 'pilot.learners.l2p' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PILOT_RESULTS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "pilot.train", "+method=l2p", "method.epochs=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    expected = "method.epochs=0 is not allowed: it must be an integer >= 1 (e.g. method.epochs=1)."
    assert lines[-1] == f"ConfigError: {expected}"
    assert "Traceback" not in out.stderr
