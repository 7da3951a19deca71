"""pilot: class-incremental learning on pre-trained models."""

__version__ = "0.1.0"
