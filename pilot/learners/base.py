"""The learner interface: the run loop calls ``fit``, ``predict``, ``state_dict`` and ``restore``.

A learner is built by Hydra from ``configs/method/<name>.yaml`` with the backbone, the scenario and
the runtime passed in::

    learner = instantiate(cfg.method, _partial_=True)(backbone=backbone, scenario=scenario, runtime=runtime)

Before its ``__init__`` runs, the classmethod ``check_requirements(backbone, scenario, params)``
sees every constructor argument and refuses, with a :class:`ConfigError` naming the ``method.*``
key, what the learner cannot run (a CNN for a prompt learner, prompt layers beyond the ViT's depth,
a prompt pool too small for the scenario...). The learner then implements a few hooks, called in
this order for every session:

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

import inspect
from abc import ABC, ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from pilot import distributed
from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, BatchStream, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError, IncompatibleBackboneError
from pilot.learners.training import LossFn, OptimizerFactory, ParamGroups, SchedulerFactory, train_trainable
from pilot.runtime import Runtime

BACKBONE_PREFIX = "backbone."


class CheckedConstruction(ABCMeta):
    """Metaclass of :class:`Learner`: ``LearnerClass(...)`` first binds the arguments to the
    learner's ``__init__`` signature (defaults filled in) and passes them to
    :meth:`Learner.check_requirements`, so a configuration the learner cannot run stops with a
    :class:`ConfigError` before the learner allocates anything (and long before training)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        params = _bind(cls, args, kwargs)
        if params is not None:
            getattr(cls, "check_requirements")(params["backbone"], params["scenario"], params)
        return super().__call__(*args, **kwargs)


def _bind(cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``__init__``'s arguments by name, or None when they do not bind (``__init__`` then raises its
    own TypeError) or do not hold a real backbone and scenario."""
    try:
        bound = inspect.signature(getattr(cls, "__init__")).bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop(next(iter(params)))  # self
    if not isinstance(params.get("backbone"), Backbone) or not isinstance(params.get("scenario"), Scenario):
        return None
    return params


class Learner(nn.Module, ABC, metaclass=CheckedConstruction):
    """Base class of every method. Subclasses set ``requires_vit`` when they hook into ViT blocks."""

    requires_vit: ClassVar[bool] = False
    eval_batch_size: int = 256  # batch size the run loop evaluates this learner with

    @property
    def eval_unit(self) -> int:
        """Data-parallel evaluation cuts a test batch only at multiples of this many samples: 1 for
        per-sample predictions; a learner whose predictions vote per group of samples returns the group."""
        return 1

    def __init__(self, backbone: Backbone, scenario: Scenario, runtime: Runtime) -> None:
        super().__init__()
        self.backbone = backbone
        self.scenario = scenario
        self.runtime = runtime
        self.known = 0  # classes learned before the current session
        self.total = 0  # classes seen once the current session is learned
        self.trainable_parameters = 0  # counted when the last session's training started

    # ----------------------------------------------------------------------- requirements
    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        """Refuse a backbone, scenario or method setting this learner cannot run, before construction.

        ``params``: every ``__init__`` argument by name (the ``method.*`` config values, defaults
        filled in). Runs the checks that apply to any learner (:func:`check_backbone_family`,
        :func:`check_block_indices`, :func:`check_top_k`). A learner with requirements of its own
        overrides this classmethod, calls ``super()`` first and adds its checks.
        """
        for requirement in (check_backbone_family, check_block_indices, check_top_k):
            requirement(cls, backbone, scenario, params)

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

    def set_training(
        self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None, epochs: int, batch_size: int
    ) -> None:
        """Keep the settings :meth:`train_epochs` trains with (learners that train with a gradient optimiser)."""
        self.optimizer, self.scheduler, self.epochs, self.batch_size = (
            optimizer,
            scheduler,
            int(epochs),
            int(batch_size),
        )

    def train_epochs(
        self,
        session: SessionData,
        loss_fn: LossFn,
        params: nn.Module | ParamGroups | None = None,
        batches: BatchStream | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> list[float]:
        """The shared loop (:func:`pilot.learners.training.train_trainable`) with the settings of
        :meth:`set_training`: a fresh optimiser over ``params`` (default: every trainable parameter),
        on ``batches`` (default: ``session``'s training batches of ``batch_size``); ``after_step`` runs
        after every optimiser step."""
        batches = session.train_batches(self.batch_size) if batches is None else batches
        params = self if params is None else params
        desc = f"{type(self).__name__} s{session.info.index}"
        return train_trainable(
            params,
            batches,
            self.epochs,
            loss_fn,
            self.optimizer,
            self.runtime,
            self.scheduler,
            desc,
            after_step=after_step,
        )

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


# --------------------------------------------------------------------------------- requirements
def check_backbone_family(cls: type, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
    """A learner with ``requires_vit`` (it prompts or adapts transformer blocks) refuses other models."""
    if getattr(cls, "requires_vit", False) and not backbone.is_vit:
        raise IncompatibleBackboneError(
            f"{cls.__name__} works on a timm VisionTransformer (it prompts or adapts the "
            f"transformer blocks), but backbone {backbone.name} is a timm {type(backbone.model).__name__}. "
            "Choose a ViT backbone, e.g. backbone=vit_b16_in1k."
        )


def check_block_indices(cls: type, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
    """Every ``method.*_layers`` list (prompt layers...) names distinct blocks ``0..depth-1`` of the ViT."""
    depth = backbone.depth
    if depth is None:
        return
    for key, value in params.items():
        layers = _int_list(value) if key.endswith("_layers") else None
        if layers is None:
            continue
        outside = [i for i in layers if not 0 <= i < depth]
        if outside:
            raise IncompatibleBackboneError(
                f"method.{key}={layers} names block(s) {outside}, but backbone {backbone.name} has {depth} "
                f"transformer blocks (0..{depth - 1}). Choose layers within 0..{depth - 1}."
            )
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ConfigError(f"method.{key}={layers} lists block(s) {repeated} more than once; list each block once.")


def check_top_k(cls: type, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
    """A learner that selects ``top_k`` prompts from a pool of ``pool_size`` needs ``1 <= top_k <= pool_size``."""
    if params.get("top_k") is None or params.get("pool_size") is None:
        return
    top_k, pool_size = int(params["top_k"]), int(params["pool_size"])
    if not 1 <= top_k <= pool_size:
        raise ConfigError(
            f"method.top_k={top_k} must be between 1 and method.pool_size={pool_size}: every sample selects "
            "top_k different prompts of the pool. Lower method.top_k or raise method.pool_size."
        )


def _int_list(value: Any) -> list[int] | None:
    """``value`` as a list of ints when it is a sequence of integers (a layer list), else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    items = list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return None
    return [int(i) for i in items]
