"""The epoch loop shared by every learner that trains with a gradient optimiser."""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pilot.data.pipeline import Batch, BatchStream
from pilot.runtime import Runtime

LossFn = Callable[[Batch], torch.Tensor]


def train_epochs(
    batches: BatchStream,
    epochs: int,
    loss_fn: LossFn,
    optimizer: Optimizer,
    runtime: Runtime,
    scheduler: LRScheduler | None = None,
    desc: str = "train",
) -> list[float]:
    """Minimise ``loss_fn`` over ``epochs`` passes of ``batches``; the scheduler steps once per epoch.

    The loss is summed on the device and read back once per epoch (no host sync per step).
    Returns the mean training loss of every epoch.
    """
    losses = []
    for epoch in range(epochs):
        total = torch.zeros((), device=runtime.device)
        steps = 0
        for batch in runtime.progress_bar(batches, desc=f"{desc} {epoch + 1}/{epochs}"):
            with runtime.autocast():
                loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().float()
            steps += 1
        if scheduler is not None:
            scheduler.step()
        losses.append(total.item() / max(steps, 1))
    return losses
