"""Build backbones from timm, with real pretrained weights or a clear error when they are missing.

Weights come from (in this order): ``checkpoint`` (a local file, prepared as timm's pretrained loader
prepares weights: checkpoint filters apply and heads are dropped; then checked against the model, see
:func:`load_checked`), or timm's hub download / local Hugging Face cache when ``pretrained`` is true.
``pretrained=false`` is an explicit random init. Offline, a missing hub download stops the run in
seconds instead of after timm's retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pilot.backbones.backbone import Backbone
from pilot.errors import ConfigError, WeightsUnavailableError
from pilot.network import host_reachable
from pilot.schema import ChannelMeans, ChannelStds, NonEmptyStr, PositiveInt

log = logging.getLogger(__name__)
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def create_timm_backbone(
    model_name: NonEmptyStr,
    pretrained: bool = True,
    checkpoint: str | None = None,
    input_size: PositiveInt = 224,
    mean: ChannelMeans | None = None,
    std: ChannelStds | None = None,
    model_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
) -> Backbone:
    """A timm model (``num_classes=0``) wrapped as a :class:`Backbone`.

    ``mean``/``std`` = the input normalisation; null means inputs in [0, 1], which is the
    reference recipe for the ViT presets (docs/methods.md §0.2). ``strict``: a ``checkpoint`` must
    provide every weight of the model and nothing else (classifier heads aside); false loads the
    weights that fit and warns about the rest (:func:`load_checked`).
    """
    kwargs = dict(model_kwargs or {})
    if model_name.split(".")[0] not in timm.list_models():
        similar = timm.list_models(f"*{model_name.split('.')[0].split('_')[0]}*")[:10]
        raise ConfigError(f"backbone.model_name={model_name!r} is not a timm model. Similar names: {similar}")
    if checkpoint:
        model = _create_from_file(model_name, Path(checkpoint).expanduser(), kwargs, strict)
    elif pretrained:
        ensure_hub_weights(model_name)
        model = timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    else:
        log.warning("backbone %s: pretrained=false, weights are randomly initialised", model_name)
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    return Backbone(model, model_name, input_size, mean, std, pretrained=bool(checkpoint) or pretrained)


def weights_hash(model: nn.Module) -> str:
    """First 12 hex digits of a SHA-256 over ``model``'s state dict (parameters and buffers), in
    sorted key order: each entry's name, dtype and shape, then its raw bytes.

    Two runs whose backbones hash alike started from the same weights. Every byte is hashed, not a
    sample, because a subset would miss weights that differ only in a few places (a partial
    fine-tune, a damaged file). The cost is SHA-256's: 0.9 to 1.6 s for ViT-B/16 (86 M float32
    parameters, 343 MB) on one core of a busy 2-core x86 machine, once per run, when the backbone is
    built (the run then spends minutes to hours); the tiny test ViT takes 7 ms."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()[:12]


def _create_from_file(model_name: str, path: Path, kwargs: dict[str, Any], strict: bool) -> nn.Module:
    """The model with the weights of the file ``path``, checked against its architecture."""
    state = read_weights_file(path)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    load_checked(model, timm_checkpoint_filter(model_name, model, state, path), path, model_name, strict)
    return model


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (.safetensors, or a torch file holding a state dict, possibly under
    ``state_dict``/``model``/EMA keys as timm reads them), or a :class:`WeightsUnavailableError`
    that says why the file cannot serve as weights."""
    where = f"backbone.checkpoint={path}"
    if not path.exists():
        raise WeightsUnavailableError(
            f"{where} does not exist; pass the path of a weights file (.safetensors, .pth, .bin)"
        )
    if not path.is_file():
        raise WeightsUnavailableError(f"{where} is a directory, not a weights file (.safetensors, .pth, .bin)")
    if not os.access(path, os.R_OK):
        raise WeightsUnavailableError(f"{where} cannot be read (permission denied); fix its permissions")
    if path.stat().st_size == 0:
        raise WeightsUnavailableError(f"{where} is empty (0 bytes); download or copy the weights file again")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch, pickle, zip and safetensors all fail in their own way
        raise WeightsUnavailableError(
            f"{where} cannot be read as a weights file ({type(err).__name__}: {str(err)[:200]}). It may be "
            "truncated (an interrupted download or copy) or not a PyTorch/safetensors state dict; download or "
            "copy it again."
        ) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise WeightsUnavailableError(f"{where} holds no tensors: it is not a state dict of model weights")
    return tensors


def timm_checkpoint_filter(
    model_name: str, model: nn.Module, state: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """``state`` as timm's pretrained loader prepares it for ``model``: the model family's checkpoint
    filter (key renames, position-embedding resampling...), and classifier head weights dropped (the
    backbone has no head)."""
    entrypoint = timm.models.model_entrypoint(model_name.split(".")[0])
    filter_fn = getattr(sys.modules[entrypoint.__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError, IndexError) as err:
            raise WeightsUnavailableError(
                f"backbone.checkpoint={path} does not fit {model_name}: timm's checkpoint filter failed "
                f"({type(err).__name__}: {str(err)[:200]}). Choose the backbone the checkpoint was saved from."
            ) from None
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}  # set on every timm model
    heads = pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str, strict: bool) -> None:
    """Load ``state`` into ``model``, refusing what would leave it silently half-initialised.

    Always refused: tensors whose shape differs from the model's, and a file of which no weight fits
    (another architecture). With ``strict``, also weights of the model the file lacks (missing) and
    weights of the file the model has no place for (unexpected); without it those are listed in a
    warning and the missing ones keep their random initialisation.
    """
    where = f"backbone.checkpoint={path}"
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        shapes = "; ".join(
            f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in wrong[:3]
        )
        raise WeightsUnavailableError(
            f"{where} does not fit {model_name}: {len(wrong)} weights have another shape ({shapes}). The file was "
            "saved from a model of another size (width, patch size, image size...); choose the backbone it was "
            "saved from (backbone.model_name / backbone.model_kwargs). backbone.strict=false does not skip these."
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if len(missing) == len(expected):
        raise WeightsUnavailableError(
            f"{where} does not fit {model_name}: none of its {len(state)} weights has a place in the model (file "
            f"keys e.g. {_examples(unexpected)}; model keys e.g. {_examples(missing)}). It was saved from another "
            "architecture; choose the backbone it was saved from (backbone.model_name / backbone.model_kwargs)."
        )
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(expected)} weights are missing from the file")
        parts[-1] += f" (e.g. {_examples(missing)})"
    if unexpected:
        parts.append(f"{len(unexpected)} weights of the file have no place in the model (e.g. {_examples(unexpected)})")
    mismatch = "; ".join(parts)
    if mismatch and strict:
        raise WeightsUnavailableError(
            f"{where} does not fit {model_name}: {mismatch}. Choose the backbone the file was saved from "
            "(backbone.model_name / backbone.model_kwargs), or set backbone.strict=false to load the "
            f"{len(expected) - len(missing)} weights that fit (missing ones keep their random initialisation, "
            "unexpected ones are ignored)."
        )
    if mismatch:
        log.warning("backbone.strict=false: %s loaded partially into %s: %s", path, model_name, mismatch)
    model.load_state_dict(state, strict=False)


def _examples(keys: list[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) if keys else "none"


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
    # timm's url is a URL or (URL, cached file name), as its download_cached_file reads it.
    url, cached_name = cfg.url if isinstance(cfg.url, tuple) else (cfg.url, (cfg.url or "").rsplit("/", 1)[-1])
    if (
        url
        and (
            Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints" / cached_name
        ).exists()
    ):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    source = constants.ENDPOINT if hub_id else url
    if offline or not source or not host_reachable(source, timeout_s=5):
        raise WeightsUnavailableError(
            f"Pretrained weights for {model_name} are not in the local cache ({constants.HF_HUB_CACHE}) and "
            f"{'HF_HUB_OFFLINE is set' if offline else f'{source} cannot be reached'}. Either run once where "
            "the hub is reachable (timm caches the weights), copy a Hugging Face cache here and set HF_HOME, "
            "or download the weights file and pass backbone.checkpoint=/path/to/model.safetensors. "
            "(backbone.pretrained=false gives random weights, for tests only.)"
        )
