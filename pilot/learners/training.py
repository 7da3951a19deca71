"""The epoch loop shared by every learner that trains with a gradient optimiser.

After each epoch the loop can report the epoch's mean loss and learning rate to an :data:`EpochHook`:
one passed as ``on_epoch``, or else the one the run loop leaves on the runtime
(``runtime.on_epoch``; absent or ``None`` = nobody listens). Learners never see it: they call
:func:`train_epochs` as before, and the run loop decides per session who is told (the results
sinks, see :func:`pilot.sinks.base.epoch_hook`).
"""

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
EpochHook = Callable[[int, float, float], None]
"""``hook(epoch, loss, lr)`` after each epoch: the epoch (from 0, within one :func:`train_epochs`
call), its mean training loss and the learning rate it ran with (the first parameter group's)."""


def train_epochs(
    batches: BatchStream,
    epochs: int,
    loss_fn: LossFn,
    optimizer: Optimizer,
    runtime: Runtime,
    scheduler: LRScheduler | None = None,
    desc: str = "train",
    *,
    on_epoch: EpochHook | None = None,
) -> list[float]:
    """Minimise ``loss_fn`` over ``epochs`` passes of ``batches``; the scheduler steps once per epoch.

    The loss is summed on the device and read back once per epoch (no host sync per step).
    Returns the mean training loss of every epoch. ``on_epoch`` (default: ``runtime.on_epoch``, if
    set) hears each epoch's mean loss and learning rate; the lr is read before the scheduler steps,
    so it is the one the epoch used.
    """
    hook = on_epoch if on_epoch is not None else getattr(runtime, "on_epoch", None)
    losses = []
    for epoch in range(epochs):
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else float("nan")
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
        if hook is not None:
            hook(epoch, losses[-1], lr)
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
    *,
    on_epoch: EpochHook | None = None,
) -> list[float]:
    """:func:`train_epochs` with a fresh optimiser (and scheduler) over every parameter of ``module``
    that requires a gradient: the reference rebuilds the optimiser at every session
    (``reinit_optimizer``), so no moment estimates carry over between sessions."""
    opt = optimizer([p for p in module.parameters() if p.requires_grad])
    sched = scheduler(opt) if scheduler is not None else None
    return train_epochs(batches, epochs, loss_fn, opt, runtime, sched, desc, on_epoch=on_epoch)
