"""The learner interface: the run loop calls ``fit``, ``predict``, ``state_dict`` and ``restore``.

A learner is built by Hydra from ``configs/method/<name>.yaml`` with the backbone, the scenario and
the runtime passed in::

    learner = instantiate(cfg.method, _partial_=True)(backbone=backbone, scenario=scenario, runtime=runtime)

and implements a few hooks, called in this order for every session:

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

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch, SessionData
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import IncompatibleBackboneError
from pilot.runtime import Runtime

BACKBONE_PREFIX = "backbone."


class Learner(nn.Module, ABC):
    """Base class of every method. Subclasses set ``requires_vit`` when they hook into ViT blocks."""

    requires_vit: ClassVar[bool] = False
    eval_batch_size: int = 256  # batch size the run loop evaluates this learner with

    def __init__(self, backbone: Backbone, scenario: Scenario, runtime: Runtime) -> None:
        super().__init__()
        if self.requires_vit and not backbone.is_vit:
            raise IncompatibleBackboneError(
                f"{type(self).__name__} works on a timm VisionTransformer (it prompts or adapts the "
                f"transformer blocks), but backbone {backbone.name} is a timm {type(backbone.model).__name__}. "
                "Choose a ViT backbone, e.g. backbone=vit_b16_in1k."
            )
        self.backbone = backbone
        self.scenario = scenario
        self.runtime = runtime
        self.known = 0  # classes learned before the current session
        self.total = 0  # classes seen once the current session is learned
        self.trainable_parameters = 0  # counted when the last session's training started

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

    # ------------------------------------------------------------------------ the run loop
    def fit(self, session: SessionData) -> None:
        self.begin_session(session.info)
        self.trainable_parameters = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self.train_session(session)
        self.end_session(session)

    def restore(self, state: Mapping[str, Any], sessions_done: int) -> None:
        """Rebuild the structure of ``sessions_done`` finished sessions, then load ``state``."""
        for info in self.scenario.sessions[:sessions_done]:
            self.begin_session(info)
        self.load_state_dict(state)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        if self.backbone.frozen:
            prefix = kwargs.get("prefix", "") + BACKBONE_PREFIX
            state = type(state)((k, v) for k, v in state.items() if not k.startswith(prefix))
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
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
