"""Pretrained backbones (timm), the hooks that prompt and adapt them, and weight loading."""
