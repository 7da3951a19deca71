"""The epoch loop shared by every learner that trains with a gradient optimiser."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pilot.data.pipeline import Batch, BatchStream
from pilot.runtime import Runtime

LossFn = Callable[[Batch], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]  # e.g. partial(Adam, lr=...) from YAML
SchedulerFactory = Callable[[Optimizer], LRScheduler]


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


def train_trainable(
    module: nn.Module,
    batches: BatchStream,
    epochs: int,
    loss_fn: LossFn,
    optimizer: OptimizerFactory,
    runtime: Runtime,
    scheduler: SchedulerFactory | None = None,
    desc: str = "train",
) -> list[float]:
    """:func:`train_epochs` with a fresh optimiser (and scheduler) over every parameter of ``module``
    that requires a gradient: the reference rebuilds the optimiser at every session
    (``reinit_optimizer``), so no moment estimates carry over between sessions."""
    opt = optimizer([p for p in module.parameters() if p.requires_grad])
    return train_epochs(batches, epochs, loss_fn, opt, runtime, scheduler(opt) if scheduler is not None else None, desc)
