"""The :class:`Backbone` wrapper every learner receives: a timm model that returns pooled features."""

from __future__ import annotations

from typing import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class Backbone(nn.Module):
    """A timm model built with ``num_classes=0`` plus what the input pipeline needs to know.

    ``forward(x)`` returns the pooled pre-logits feature ``[B, feature_dim]``: for a ViT the CLS
    token after the final LayerNorm, for a CNN the global-average-pooled last feature map.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        input_size: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        pretrained: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = input_size
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.pretrained = pretrained
        self.frozen = False

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.model, "num_features"))  # every timm model has it; nn.Module does not declare it

    @property
    def is_vit(self) -> bool:
        """True for timm VisionTransformers, which prompt and adapter learners require."""
        return isinstance(self.model, VisionTransformer)

    @property
    def depth(self) -> int | None:
        """Number of transformer blocks of a ViT (the valid prompt/adapter layers are ``0..depth-1``);
        None for other models."""
        return len(self.model.blocks) if isinstance(self.model, VisionTransformer) else None

    @property
    def vit(self) -> VisionTransformer:
        if not self.is_vit:
            raise TypeError(f"backbone {self.name} is not a timm VisionTransformer")
        return self.model  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def freeze(self) -> "Backbone":
        """Freeze all weights and keep the model in eval mode for good (no dropout, fixed
        BatchNorm statistics), even when a learner that owns it calls ``train()``."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(mode and not self.frozen)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
