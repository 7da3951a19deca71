"""What runs in float32 whatever the run precision (docs/methods.md §0.1, "bf16 and fp32").

Under bf16 autocast (the default on CUDA) the backbone's matmuls and convolutions run in bfloat16:
8 bits of mantissa, a relative rounding step of 2^-8 ~ 0.4%. That is harmless inside a network but
spoils the small computations that decide a prediction or become stored statistics: a cosine of
0.93 is rounded to a multiple of 2^-8 ~ 0.004, so near-ties between classes are decided by
rounding, and class covariances pick up the rounding noise of every feature. The rule here:
**the backbone may run in bf16; everything after the pooled feature runs in float32 (or float64)**:

* classifier heads and logits (:class:`FP32Linear`, ``CosineLinear``, EASE's ensemble);
* class means, covariances, their Cholesky factors and the samples drawn from them (float64 /
  float32, ``modules/gaussian.py``), classifier alignment and its logit normalisation;
* SLCA's class-statistics pass and its evaluation pass run the backbone itself in float32: the
  covariances are the most sensitive statistic, and the heads aligned on them then see test features
  of the same precision (each pass is one forward over a session's images: a few % of SLCA's time);
* prompt selection scores, CODA's component weights and Gram-Schmidt (float64) (``modules/prompt_pools.py``).

All of this costs little: heads and statistics are tiny next to the backbone.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn


def autocast_off(device: torch.device | str) -> torch.autocast:
    """A context in which autocast is disabled on ``device``'s type (ops run in their inputs' dtype)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=device_type, enabled=False)


F_ = TypeVar("F_", bound=Callable)


def float32_compute(fn: F_) -> F_:
    """Decorator: run ``fn`` with autocast disabled on the device of its first tensor argument, so
    its float32 inputs stay float32 even when it is called inside a bf16 autocast region."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors:
            return fn(*args, **kwargs)
        with autocast_off(tensors[0].device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class FP32Linear(nn.Linear):
    """``nn.Linear`` that computes in float32 under autocast (same parameters, names and init as
    ``nn.Linear``; outside autocast it is ``nn.Linear``). Used for every classifier head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
