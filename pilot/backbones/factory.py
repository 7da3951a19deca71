"""Build backbones from timm, with real pretrained weights or a clear error when they are missing.

Weights come from (in this order): ``checkpoint`` (a local file, loaded through timm's pretrained
loader so that heads are dropped and checkpoint filters apply), or timm's hub download / local
Hugging Face cache when ``pretrained`` is true. ``pretrained=false`` is an explicit random init.
Offline, a missing hub download stops the run in seconds instead of after timm's retries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import timm
from torch import nn

from pilot.backbones.backbone import Backbone
from pilot.errors import ConfigError, WeightsUnavailableError
from pilot.net import host_reachable

log = logging.getLogger(__name__)
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def create_timm_backbone(
    model_name: str,
    pretrained: bool = True,
    checkpoint: str | None = None,
    input_size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """A timm model (``num_classes=0``) wrapped as a :class:`Backbone`.

    ``mean``/``std`` = the input normalisation; null means inputs in [0, 1], which is the
    reference recipe for the ViT presets (docs/methods.md §0.2).
    """
    kwargs = dict(model_kwargs or {})
    if model_name.split(".")[0] not in timm.list_models():
        similar = timm.list_models(f"*{model_name.split('.')[0].split('_')[0]}*")[:10]
        raise ConfigError(f"backbone.model_name={model_name!r} is not a timm model. Similar names: {similar}")
    if checkpoint:
        model = _create_from_file(model_name, Path(checkpoint).expanduser(), kwargs)
    elif pretrained:
        ensure_hub_weights(model_name)
        model = timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    else:
        log.warning("backbone %s: pretrained=false, weights are randomly initialised", model_name)
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    return Backbone(model, model_name, input_size, mean, std, pretrained=bool(checkpoint) or pretrained)


def _create_from_file(model_name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"backbone.checkpoint={path} does not exist; pass the path of a weights file (.safetensors, .pth, .bin)"
        )
    try:
        return timm.create_model(
            model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise WeightsUnavailableError(
            f"backbone.checkpoint={path} could not be loaded into {model_name}: {err}"
        ) from err


def ensure_hub_weights(model_name: str) -> None:
    """Raise :class:`WeightsUnavailableError` at once if timm could not get ``model_name``'s
    pretrained weights: not in the local cache and the hub not reachable."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(model_name, allow_unregistered=False)
    except RuntimeError as err:
        raise ConfigError(f"timm has no pretrained weights named {model_name!r}: {err}") from err
    if cfg is None:
        raise ConfigError(f"timm has no pretrained weights named {model_name!r}; add a tag such as '.augreg_in21k'")
    hub_id = (cfg.hf_hub_id or "").split("@")[0]
    if hub_id and any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in HUB_WEIGHT_FILES):
        return
    if (
        cfg.url
        and (
            Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser()
            / "hub"
            / "checkpoints"
            / cfg.url.rsplit("/", 1)[-1]
        ).exists()
    ):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    source = constants.ENDPOINT if hub_id else cfg.url
    if offline or not source or not host_reachable(source, timeout_s=5):
        raise WeightsUnavailableError(
            f"Pretrained weights for {model_name} are not in the local cache ({constants.HF_HUB_CACHE}) and "
            f"{'HF_HUB_OFFLINE is set' if offline else f'{source} cannot be reached'}. Either run once where "
            "the hub is reachable (timm caches the weights), copy a Hugging Face cache here and set HF_HOME, "
            "or download the weights file and pass backbone.checkpoint=/path/to/model.safetensors. "
            "(backbone.pretrained=false gives random weights, for tests only.)"
        )
