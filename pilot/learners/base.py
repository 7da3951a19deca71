"""The learner interface: the run loop calls ``fit``, ``predict``, ``state_dict`` and ``restore``.

A learner is built from ``configs/method/<name>.yaml`` by :func:`build_learner`. Its hyperparameters are
annotated class attributes with a default (the reference setting), declared like dataclass fields on the
learner or inherited from its bases; its constructor takes one :class:`LearnerSetup` (the backbone, the
scenario, the runtime and the :class:`Training` settings of the shared training loop) and the values to
change, which :class:`Learner` sets on the instance before the subclass's ``__init__`` body runs::

    @register_learner("l2p")
    class L2P(PromptPoolLearner):
        pool_size: PositiveInt = 10      # read as self.pool_size; method.pool_size in YAML
        top_k: PositiveInt = 5

        def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
            super().__init__(setup, **settings)
            self.pool = PromptPool(self.pool_size, ...)

A subclass changes an inherited default by declaring the field again. Class constants that are not
hyperparameters are ``ClassVar`` (``requires_vit``); an annotation without a value declares an instance
attribute (a buffer), not a hyperparameter. The YAML keeps every ``method.*`` key flat:
:meth:`Learner.create` hands the keys that name a :class:`Training` field (``optimizer``, ``scheduler``,
``epochs``, ``batch_size``, ``eval_batch_size``) to :class:`Training` and the rest to the constructor.
Defaults live in the YAML (the reference settings); the fields' defaults must equal them.

Before its ``__init__`` runs, the classmethod ``check_requirements(backbone, scenario, params)``
sees every setting (the training fields and the hyperparameters, defaults filled in) and refuses, with a
:class:`ConfigError` naming the ``method.*`` key, what the learner cannot run (a CNN for a prompt
learner, prompt layers beyond the ViT's depth, a prompt pool too small for the scenario...). The
learner then implements a few hooks, called in this order for every session:

``begin_session(info)``
    grow the structure for the new classes (classifier rows, a new head, a new adapter set, a
    prompt slice...) and initialise the new parameters. It must not look at data: :meth:`restore`
    replays it for the finished sessions to rebuild the shapes before loading a checkpoint.
``train_session(session)``
    train on the session's data (optional: training-free methods leave it out).
``end_session(session)``
    work after training that still uses the session's data: prototypes, class statistics,
    classifier alignment.
``predict(batch)``
    logits ``[B, total]`` over every class seen so far.

Checkpoints hold ``state_dict()``. The weights of a *frozen* backbone are left out (they are rebuilt
from the same pretrained weights on resume), so modules a learner attaches to the backbone must be
registered on the learner, not inside ``self.backbone``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from abc import ABC, ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch
from torch import nn

from pilot import distributed
from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, BatchStream, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.requirements import COMMON_REQUIREMENTS
from pilot.learners.training import LossFn, OptimizerFactory, ParamGroups, SchedulerFactory, train_trainable
from pilot.modules.features import extract_features
from pilot.runtime import Runtime
from pilot.schema import PositiveInt

BACKBONE_PREFIX = "backbone."
L = TypeVar("L", bound="Learner")


@dataclass(frozen=True)
class Training:
    """The settings of the shared training loop (:meth:`Learner.train_epochs`), flat ``method.*`` keys.

    ``optimizer`` and ``scheduler`` are factories (``_partial_`` nodes in YAML), rebuilt at every session;
    ``epochs`` per session; ``batch_size`` of training (and of the learner's own feature passes unless it
    has a separate setting); ``eval_batch_size`` of the run loop's test passes. A training-free learner
    (SimpleCIL) leaves ``optimizer`` unset."""

    optimizer: OptimizerFactory | None = None
    scheduler: SchedulerFactory | None = None
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 256


TRAINING_KEYS = frozenset(field.name for field in dataclasses.fields(Training))
INFERENCE_KEYS = frozenset({"batch_size", "eval_batch_size"})  # the Training fields of a training-free learner


@dataclass(frozen=True)
class LearnerSetup:
    """What the run gives every learner: the backbone, the scenario, the runtime and the training settings."""

    backbone: Backbone
    scenario: Scenario
    runtime: Runtime
    training: Training = Training()


InferenceSetup = LearnerSetup
"""The annotation of a training-free learner's ``setup`` (SimpleCIL): the same object, but the config schema
then offers only :data:`INFERENCE_KEYS` of :class:`Training`, so ``method.epochs`` is refused as a typo is."""


class CheckedConstruction(ABCMeta):
    """Metaclass of :class:`Learner`: ``LearnerClass(setup, **settings)`` first refuses a setting that is not
    one of the learner's hyperparameters (a TypeError listing them) and passes every setting, defaults
    filled in, to :meth:`Learner.check_requirements`, so a configuration the learner cannot run stops with
    a :class:`ConfigError` before the learner allocates anything (and long before training)."""

    def __call__(cls, *args: Any, **settings: Any) -> Any:
        setup = args[0] if args else settings.get("setup")
        if isinstance(setup, LearnerSetup):
            own = {k: v for k, v in settings.items() if k != "setup"}
            declared = getattr(cls, "hyperparameters")()
            unknown = sorted(set(own) - set(declared))
            if unknown:
                raise TypeError(
                    f"{cls.__name__} has no hyperparameter {', '.join(unknown)}; "
                    f"its hyperparameters are: {', '.join(declared) or 'none'}."
                )
            params = {**dataclasses.asdict(setup.training), **declared, **own}
            getattr(cls, "check_requirements")(setup.backbone, setup.scenario, params)
        return super().__call__(*args, **settings)


def _is_class_var(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


class Learner(nn.Module, ABC, metaclass=CheckedConstruction):
    """Base class of every method. Subclasses declare their hyperparameters as annotated class attributes
    and set ``requires_vit`` when they hook into ViT blocks."""

    requires_vit: ClassVar[bool] = False

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Every hyperparameter of this learner by name, with its default: the annotated class attributes
        with a value (not ``ClassVar``) of the learner and its learner bases; a subclass's default wins."""
        found: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if not issubclass(klass, Learner):
                continue
            for name, annotation in inspect.get_annotations(klass).items():
                if name in vars(klass) and not _is_class_var(annotation):
                    found[name] = vars(klass)[name]
        return found

    @property
    def eval_unit(self) -> int:
        """Data-parallel evaluation cuts a test batch only at multiples of this many samples: 1 for
        per-sample predictions; a learner whose predictions vote per group of samples returns the group."""
        return 1

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__()
        for name, default in type(self).hyperparameters().items():  # the metaclass refused unknown names
            setattr(self, name, copy.copy(settings.get(name, default)))
        self.backbone, self.scenario, self.runtime = setup.backbone, setup.scenario, setup.runtime
        training = setup.training
        self.optimizer, self.scheduler = training.optimizer, training.scheduler
        self.epochs, self.batch_size = int(training.epochs), int(training.batch_size)
        self.eval_batch_size = int(training.eval_batch_size)  # the run loop evaluates in batches of this size
        self.known = 0  # classes learned before the current session
        self.total = 0  # classes seen once the current session is learned
        self.trainable_parameters = 0  # counted when the last session's training started

    @classmethod
    def create(cls: type[L], backbone: Backbone, scenario: Scenario, runtime: Runtime, **settings: Any) -> L:
        """The learner with flat ``settings`` as in ``configs/method/*.yaml``: the :class:`Training` fields
        among them go to :class:`Training`, the others to the constructor."""
        training = Training(**{k: v for k, v in settings.items() if k in TRAINING_KEYS})
        own = {k: v for k, v in settings.items() if k not in TRAINING_KEYS}
        return cls(LearnerSetup(backbone, scenario, runtime, training), **own)

    # ----------------------------------------------------------------------- requirements
    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        """Refuse a backbone, scenario or method setting this learner cannot run, before construction.

        ``params``: every setting by name (the ``method.*`` config values: the :class:`Training` fields
        and the hyperparameters, defaults filled in). Runs the checks that apply to any learner
        (:func:`check_backbone_family`, :func:`check_block_indices`, :func:`check_top_k`, :func:`check_optimizer`).
        A learner with requirements of its own overrides this classmethod, calls ``super()`` first and adds its checks.
        """
        for requirement in COMMON_REQUIREMENTS:
            requirement(cls, backbone, scenario, params)

    @classmethod
    def trains(cls) -> bool:
        """Whether this learner takes gradient steps (it overrides :meth:`train_session`)."""
        return cls.train_session is not Learner.train_session

    # ------------------------------------------------------------------------------ hooks
    def begin_session(self, info: SessionInfo) -> None:
        """Grow for the new classes. Subclasses extend this and call ``super().begin_session``."""
        self.known, self.total = info.known, info.total

    def train_session(self, session: SessionData) -> None:
        """Train on the session's data. Default: nothing (training-free methods)."""

    def end_session(self, session: SessionData) -> None:
        """Work after training: prototypes, statistics, alignment. Default: nothing."""

    @abstractmethod
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B, total]`` over all classes seen so far."""

    @property
    def eval_protocol(self) -> str:
        """How :meth:`predict` treats a batch, written into every result row: ``per-sample`` when each
        sample's logits are independent of the other samples of its batch (the default). A learner
        whose test predictions depend on the batch overrides this (e.g. ``batch-vote(b=24)``)."""
        return "per-sample"

    # ------------------------------------------------------------------------ the run loop
    def fit(self, session: SessionData) -> None:
        self.begin_session(session.info)
        self.trainable_parameters = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self.train_session(session)
        self.end_session(session)
        distributed.broadcast_state(self)  # data-parallel runs: every rank continues from rank 0's state

    def train_epochs(
        self,
        session: SessionData,
        loss_fn: LossFn,
        params: nn.Module | ParamGroups | None = None,
        batches: BatchStream | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> list[float]:
        """The shared loop (:func:`pilot.learners.training.train_trainable`) with :meth:`session_training`'s
        settings: a fresh optimiser over ``params`` (default: every trainable parameter), on ``batches``
        (default: :meth:`session_batches`); ``after_step`` runs after every optimiser step. The gradients
        are freed afterwards."""
        optimizer, scheduler, epochs = self.session_training()
        batches = self.session_batches(session) if batches is None else batches
        desc = f"{type(self).__name__} s{session.info.index}"
        params = self if params is None else params
        losses = train_trainable(
            params, batches, epochs, loss_fn, optimizer, self.runtime, scheduler, desc, after_step=after_step
        )
        self.zero_grad(set_to_none=True)
        return losses

    def session_training(self) -> tuple[OptimizerFactory, SchedulerFactory | None, int]:
        """(optimizer, scheduler, epochs) of the current session: the :class:`Training` settings. A learner
        that trains some sessions otherwise (the replay learners' ``init_*`` settings) overrides it."""
        return self.optimizer_factory, self.scheduler, self.epochs

    def session_batches(self, session: SessionData) -> BatchStream:
        """What :meth:`train_epochs` trains on by default: the new classes' training images (shuffled, train
        transform), in batches of ``batch_size``."""
        return session.train_batches(self.batch_size)

    def class_features(
        self,
        session: SessionData,
        features: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        what: str,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features(images)`` of the session's new-class training images (test transform, class-sorted) and
        their labels: the prototype and class-statistics pass. ``what`` names it in the progress bar;
        ``options`` go to :func:`pilot.modules.features.extract_features` (``eval_mode``, ``full_precision``,
        ``cache``)."""
        batches, desc = session.prototype_batches(batch_size), f"{what} s{session.info.index}"
        return extract_features(features, batches, self.runtime, desc=desc, **options)

    @property
    def optimizer_factory(self) -> OptimizerFactory:
        """``method.optimizer``, for a learner that trains (a ConfigError where the config leaves it unset)."""
        if self.optimizer is None:
            raise ConfigError(f"method.optimizer is not set: {type(self).__name__} trains with a gradient optimiser.")
        return self.optimizer

    def restore(self, state: Mapping[str, Any], sessions_done: int) -> None:
        """Rebuild the structure of ``sessions_done`` finished sessions, then load ``state``."""
        for info in self.scenario.sessions[:sessions_done]:
            self.begin_session(info)
        self.load_state_dict(state)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        if self.backbone.frozen:
            prefix = kwargs.get("prefix", "") + BACKBONE_PREFIX
            state = type(state)((k, v) for k, v in state.items() if not k.startswith(prefix))
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if not self.backbone.frozen:
            return super().load_state_dict(state, strict=strict, assign=assign)
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(BACKBONE_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return result

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_learner(method: Any, backbone: Backbone, scenario: Scenario, runtime: Runtime) -> Learner:
    """The learner that the ``method`` config node describes (``_target_`` and flat settings), on
    ``backbone``, ``scenario`` and ``runtime`` (see :meth:`Learner.create`)."""
    from pilot.config import build  # the run's instantiate: nested _target_ nodes (optimisers) built here

    # A partial, then a plain call: instantiate() would turn dataclass arguments into DictConfigs.
    factory: functools.partial = build(method, _partial_=True)
    learner_class = typing.cast("type[Learner]", factory.func)
    return learner_class.create(backbone, scenario, runtime, **factory.keywords)
