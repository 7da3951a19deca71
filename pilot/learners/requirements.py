"""Checks that apply to every learner, run by :meth:`pilot.learners.base.Learner.check_requirements` before the
learner is built: each takes ``(learner class, backbone, scenario, params)`` (``params``: every ``method.*``
setting, defaults filled in) and raises a :class:`ConfigError` naming the key and the fix."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from pilot.backbones.backbone import Backbone
from pilot.data.scenario import Scenario
from pilot.errors import ConfigError, IncompatibleBackboneError

Requirement = Callable[[type, Backbone, Scenario, Mapping[str, Any]], None]


def check_backbone_family(cls: type, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
    """A learner with ``requires_vit`` (it prompts or adapts transformer blocks) refuses other models."""
    if getattr(cls, "requires_vit", False) and not backbone.is_vit:
        raise IncompatibleBackboneError(
            f"{cls.__name__} works on a timm VisionTransformer (it prompts or adapts the "
            f"transformer blocks), but backbone {backbone.name} is a timm {type(backbone.model).__name__}. "
            "Choose a ViT backbone, e.g. backbone=vit_b16_in1k."
        )


def check_optimizer(cls: type, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
    """A learner that trains (it has a ``train_session``) needs ``method.optimizer``; one that does not
    refuses it (an optimiser there would be a setting that changes nothing)."""
    trains = getattr(cls, "trains")()
    if trains and params.get("optimizer") is None:
        raise ConfigError(
            f"method.optimizer is not set, but {cls.__name__} trains with a gradient optimiser. Set it in the "
            "method's YAML (e.g. {_target_: torch.optim.SGD, _partial_: true, lr: 0.01})."
        )
    if not trains and (params.get("optimizer") is not None or params.get("scheduler") is not None):
        raise ConfigError(
            f"{cls.__name__} does not train (no gradient steps): remove method.optimizer and method.scheduler."
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


COMMON_REQUIREMENTS: tuple[Requirement, ...] = (
    check_backbone_family,
    check_block_indices,
    check_top_k,
    check_optimizer,
)
