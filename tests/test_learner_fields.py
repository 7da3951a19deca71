"""Hyperparameters are annotated class fields (pilot/learners/base.py): what counts as one, inheritance,
overrides, unknown names, and that the config schema reads the same keys from source as from the class."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from conftest import FAST, compose_config
from hydra.utils import get_object

from pilot import schema
from pilot.api import make_learner
from pilot.backbones.backbone import Backbone
from pilot.config import build
from pilot.data.pipeline import Batch
from pilot.data.scenario import make_scenario
from pilot.learners.base import TRAINING_KEYS, Learner, LearnerSetup
from pilot.learners.dualprompt import DualPrompt
from pilot.learners.l2p import L2P
from pilot.learners.prompt_pool_learner import PromptPoolLearner
from pilot.registry import learners
from pilot.runtime import Runtime
from pilot.schema import PositiveInt, Probability

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)


class Mixer(Learner):
    mix: Probability = 0.5
    rounds: PositiveInt = 3
    names: list[str] = ["a"]  # noqa: RUF012 - a mutable default: every learner gets its own copy
    unit: ClassVar[int] = 7  # a class constant, not a hyperparameter
    prototypes: torch.Tensor  # a declared buffer, not a hyperparameter

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        self.seen_in_init = (self.mix, self.rounds)

    def predict(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(len(batch.labels), self.total)


class Remixer(Mixer):
    rounds: PositiveInt = 5  # a subclass changes an inherited default by declaring the field again
    depth: PositiveInt = 2


@pytest.fixture(scope="module")
def setup() -> LearnerSetup:
    torch.manual_seed(0)
    backbone: Backbone = build(compose_config(FAST).backbone)
    return LearnerSetup(backbone, make_scenario(4, 2, 2, class_order="natural"), CPU)


def test_fields_with_a_value_are_the_hyperparameters_in_declaration_order():
    assert Mixer.hyperparameters() == {"mix": 0.5, "rounds": 3, "names": ["a"]}
    assert Remixer.hyperparameters() == {"mix": 0.5, "rounds": 5, "names": ["a"], "depth": 2}


def test_values_are_set_before_the_subclass_body_runs_and_defaults_are_copied(setup):
    first = Remixer(setup, mix=0.25)
    assert first.seen_in_init == (0.25, 5) and (first.mix, first.rounds, first.depth) == (0.25, 5, 2)
    first.names.append("b")
    second = Remixer(setup)
    assert second.names == ["a"] and second.mix == 0.5 and Mixer.names == ["a"]


def test_an_unknown_hyperparameter_is_refused_with_the_valid_names(setup):
    with pytest.raises(
        TypeError, match=r"Mixer has no hyperparameter mixx; its hyperparameters are: mix, rounds, names"
    ):
        Mixer(setup, mixx=0.1)
    with pytest.raises(TypeError, match="no hyperparameter unit"):  # a ClassVar is not settable
        Mixer(setup, unit=3)


def test_prompt_learners_share_the_pool_settings_and_override_their_defaults():
    """PromptPoolLearner declares the pool and vote settings once; DualPrompt changes two defaults."""
    shared = {"pool_size", "top_k", "batchwise_prompt", "batchwise_prompt_eval", "vote_batch_size", "pull_coeff"}
    assert shared <= set(PromptPoolLearner.hyperparameters())
    assert shared <= set(L2P.hyperparameters()) and shared <= set(DualPrompt.hyperparameters())
    assert (L2P.hyperparameters()["top_k"], L2P.hyperparameters()["vote_batch_size"]) == (5, 16)
    assert (DualPrompt.hyperparameters()["top_k"], DualPrompt.hyperparameters()["vote_batch_size"]) == (1, 24)


def test_make_learner_sets_the_yaml_values_and_the_overrides(setup):
    learner = make_learner("l2p", setup.backbone, setup.scenario, CPU, pool_size=12, top_k=3, epochs=2)
    assert (learner.pool_size, learner.top_k, learner.prompt_length, learner.epochs) == (12, 3, 5, 2)
    assert learner.pool.keys.shape[0] == 12 and learner.eval_batch_size % learner.vote_batch_size == 0


@pytest.mark.parametrize("name", sorted(learners()))
def test_the_schema_reads_each_learners_fields_and_training_keys(name):
    """Source and imported class give the same keys in the same order: the Training fields (all, or the
    batch sizes of a training-free learner) first, then every hyperparameter with its default."""
    target = learners()[name].target
    cls = get_object(target)
    from_source = schema._signature_from_source(target)
    assert from_source is not None and not from_source.open
    training = [k for k in from_source.params if k in TRAINING_KEYS]
    assert list(from_source.params) == training + list(cls.hyperparameters())
    assert set(training) in (set(TRAINING_KEYS), {"batch_size", "eval_batch_size"})
    for key, default in cls.hyperparameters().items():
        read = from_source.params[key].default
        assert read is schema.UNKNOWN or read == default or list(read) == list(default), f"{name}.{key}"
