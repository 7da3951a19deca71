"""Logit masking for class-incremental training with one shared head (L2P, DualPrompt, CODA-Prompt)."""

from __future__ import annotations

import torch


def seen_class_logits(logits: torch.Tensor, total: int) -> torch.Tensor:
    """Logits of the classes seen so far: the first ``total`` columns of a head sized for every
    class of the dataset (future classes are never scored)."""
    return logits[:, :total]


def mask_old_classes(logits: torch.Tensor, known: int, total: int) -> torch.Tensor:
    """Training logits of LAMDA-PILOT's prompt learners (docs/methods.md §1.2, §2.2, §3.2)::

        z'_c = z_c    for known <= c < total   (classes of the current session)
        z'_c = -inf   for c < known             (old classes)
        columns c >= total are dropped           (future classes)

    so that ``cross_entropy(z', y)`` is a softmax over the current session's classes only
    (``logits[:, :known] = -inf`` in PILOT's ``models/l2p.py``, ``dualprompt.py``, ``coda_prompt.py``;
    the "train-time mask" of l2p-pytorch). Out of place, so it is safe under autograd.
    """
    logits = seen_class_logits(logits, total)
    if known == 0:
        return logits
    old = torch.arange(total, device=logits.device) < known
    return logits.masked_fill(old, float("-inf"))
