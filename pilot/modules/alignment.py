"""Classifier alignment on features sampled from class Gaussians (SLCA, docs/methods.md §6.2).

Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", ICCV 2023; behaviour as LAMDA-PILOT ``models/slca.py: _stage2_compact_classifier``.

Each alignment epoch draws ``n`` = 256 samples of every seen class c from
``N(s_c * mu_c, Sigma_c)`` with the mean down-scaling

    s_c = 0.9 + 0.1 * (t_c + 1) / (T + 1)        (t_c: session of class c, T: current session)

shuffles them and trains the classifier on mini-batches of 256 with cross-entropy on
*logit-normalised* logits (``ca_with_logit_norm`` = tau = 0.1): for each sample the l2 norm of its
logits restricted to each session block b is taken, ``n_b = ||z_b||_2 + 1e-7``; their mean over
the blocks divides all logits, and so does tau:

    z'_j = z_j / (mean_b n_b) / tau
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pilot.learners.training import train_trainable
from pilot.modules.gaussian import ClassGaussians
from pilot.modules.precision import autocast_off, float32_compute
from pilot.runtime import Runtime

LOGIT_NORM_EPS = 1e-7  # added to every per-session norm (reference)


@float32_compute
def session_normalized_logits(
    logits: torch.Tensor, blocks: torch.Tensor, tau: float, num_blocks: int | None = None
) -> torch.Tensor:
    """Logit normalisation of SLCA: ``logits`` ``[B, C]`` divided per sample by the mean over session
    blocks of the blocks' l2 norms (each + 1e-7), and by ``tau``. ``blocks`` ``[C]``: the session
    block of each logit column (0..num_blocks-1, every block present); pass ``num_blocks`` to avoid
    reading it from the device."""
    logits = logits.float()
    if num_blocks is None:
        num_blocks = int(blocks.max()) + 1 if blocks.numel() else 0
    squares = torch.zeros(logits.shape[0], num_blocks, device=logits.device, dtype=logits.dtype)
    squares.index_add_(1, blocks.to(logits.device), logits.square())
    norms = (squares.sqrt() + LOGIT_NORM_EPS).mean(dim=1, keepdim=True)
    return logits / norms / tau


def mean_scale(class_sessions: torch.Tensor, current_session: int) -> torch.Tensor:
    """SLCA's down-scaling of class means: ``0.9 + 0.1 * (t_c + 1) / (T + 1)`` for each class."""
    return 0.9 + 0.1 * (class_sessions.double() + 1) / (current_session + 1)


def align_classifier(
    head: nn.Module,
    gaussians: ClassGaussians,
    blocks: torch.Tensor,
    scale_sessions: torch.Tensor,
    current_session: int,
    epochs: int,
    optimizer: Callable[..., Optimizer],
    runtime: Runtime,
    scheduler: Callable[..., LRScheduler] | None = None,
    samples_per_class: int = 256,
    batch_size: int = 256,
    tau: float | None = 0.1,
) -> list[float]:
    """Train ``head`` (features ``[B, D]`` -> logits over all C seen classes) on Gaussian samples.

    ``blocks`` ``[C]``: session of each class (for the logit normalisation); ``scale_sessions`` ``[C]``:
    the ``t_c`` used in the mean scaling (the true session, or the reference's ``c // |C_T|``).
    ``optimizer``/``scheduler``: factories applied to ``head.parameters()`` / the optimizer; the
    scheduler steps once per epoch. ``tau=None`` turns the logit normalisation off.
    Runs in float32 with autocast disabled, also when called inside a bf16 autocast region (a
    linear layer on 256-row batches). The epochs run in the shared loop
    (:func:`pilot.learners.training.train_epochs`), each on a fresh draw; returns the mean loss of every epoch.
    """
    device = gaussians.means.device
    with autocast_off(device):
        num_classes = gaussians.num_classes
        blocks = blocks.to(device)
        num_blocks = int(blocks.max()) + 1
        scales = mean_scale(scale_sessions.to(device), current_session)
        scale_tril = gaussians.scale_tril().float()  # factorised once (float64), sampled in float32

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh draw of every class, shuffled, in mini-batches of ``batch_size``."""
        with autocast_off(device):
            inputs, targets = gaussians.sample(samples_per_class, mean_scale=scales, scale_tril=scale_tril)
            order = torch.randperm(len(targets), device=device)
            inputs, targets = inputs[order], targets[order]
        for start in range(0, len(targets), batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with autocast_off(device):  # also inside the run's bf16 autocast (train_epochs enters it)
            logits = head(batch[0])[:, :num_classes]
            if tau:
                logits = session_normalized_logits(logits, blocks, tau, num_blocks)
            return F.cross_entropy(logits.float(), batch[1])

    with autocast_off(device):
        return train_trainable(
            head, epoch_batches, epochs, loss_fn, optimizer, runtime, scheduler, "classifier alignment", on_epoch=_quiet
        )


def _quiet(epoch: int, loss: float, lr: float) -> None:
    """Alignment epochs are not reported to the run's epoch listeners (they hear the training epochs)."""
