"""The epoch loop shared by every learner that trains with a gradient optimiser.

After each epoch the loop can report the epoch's mean loss and learning rate to an :data:`EpochHook`:
one passed as ``on_epoch``, or else the one the run loop leaves on the runtime
(``runtime.on_epoch``; absent or ``None`` = nobody listens). Learners never see it: they call
:func:`train_epochs` as before, and the run loop decides per session who is told (the results
sinks, see :func:`pilot.sinks.base.epoch_hook`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pilot import distributed
from pilot.data.pipeline import Batch, BatchStream
from pilot.runtime import Runtime

LossFn = Callable[[Any], torch.Tensor]  # batch (a Batch, or alignment's (inputs, targets)) -> scalar loss
Batches = Union[Iterable[Any], Callable[[int], Iterable[Any]]]  # a stream, or epoch -> that epoch's stream
ParamGroups = Iterable[Any]  # parameters, or optimiser parameter groups (dicts)
OptimizerFactory = Callable[[ParamGroups], Optimizer]  # e.g. partial(Adam, lr=...) from YAML
SchedulerFactory = Callable[[Optimizer], LRScheduler]
EpochHook = Callable[[int, float, float], None]
"""``hook(epoch, loss, lr)`` after each epoch: the epoch (from 0, within one :func:`train_epochs`
call), its mean training loss and the learning rate it ran with (the first parameter group's)."""


def train_epochs(
    batches: Batches,
    epochs: int,
    loss_fn: LossFn,
    optimizer: Optimizer,
    runtime: Runtime,
    scheduler: LRScheduler | None = None,
    desc: str = "train",
    *,
    on_epoch: EpochHook | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Minimise ``loss_fn`` over ``epochs`` passes of ``batches``; the scheduler steps once per epoch.

    ``batches``: the same stream every epoch, or ``batches(epoch)`` for data drawn anew each epoch
    (classifier alignment's Gaussian samples), called at the start of the epoch. The loss is summed
    on the device and read back once per epoch (no host sync per step). Returns the mean training
    loss of every epoch. ``on_epoch`` (default: ``runtime.on_epoch``, if set) hears each epoch's mean
    loss and learning rate; the lr is read before the scheduler steps, so it is the one the epoch
    used. ``grad_clip``: clip the gradients' total l2 norm to this value before each step (None: no
    clipping, as the reference). ``after_step``: called after every optimiser step (e.g. an EMA copy
    or a merge of the weights just updated).

    Data-parallel runs (:mod:`pilot.distributed`): a :class:`~pilot.data.pipeline.Batch` is this rank's
    part of a global batch; the gradients of the parts are combined into the global batch's before the
    step (weighted by each part's share), and the reported loss is the global batch's. Other batches
    (alignment's sampled features) are the same on every rank and need no combining.

    ``runtime.compile`` (``default``, ``reduce-overhead``) runs ``loss_fn`` compiled (:meth:`Runtime.compiled`,
    eager where compiling fails); a :class:`Batch`'s images are then prepared (decoded, augmented) eagerly
    before the call, so the augmentation draws the same random numbers as an eager step.
    """
    hook = on_epoch if on_epoch is not None else getattr(runtime, "on_epoch", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    compiled = getattr(runtime, "compile", "off") != "off"
    step_loss = runtime.compiled(loss_fn) if compiled else loss_fn
    losses = []
    for epoch in range(epochs):
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else float("nan")
        total = torch.zeros((), device=runtime.device)
        steps = 0
        stream = batches(epoch) if callable(batches) else batches
        for batch in runtime.progress_bar(stream, desc=f"{desc} {epoch + 1}/{epochs}"):
            share = batch.share if isinstance(batch, Batch) and distributed.active() else None
            if share is not None or (compiled and isinstance(batch, Batch)):
                # Augmented now: data-parallel, from the shared RNG stream before the rank's own draws;
                # compiled, eagerly (outside the graph, on the eager RNG)
                batch.images
            with distributed.rank_rng(runtime.device) if share is not None else contextlib.nullcontext():
                with runtime.autocast():
                    loss = step_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if share is not None:
                distributed.reduce_gradients(params, share)
                loss = loss.detach() * share  # summed over ranks below: the global batch's loss
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.detach().float()
            steps += 1
        if scheduler is not None:
            scheduler.step()
        if distributed.active() and isinstance(stream, BatchStream):
            distributed.all_reduce_sum(total)
        losses.append(total.item() / max(steps, 1))
        if hook is not None:
            hook(epoch, losses[-1], lr)
    return losses


def train_trainable(
    params: nn.Module | ParamGroups,
    batches: Batches,
    epochs: int,
    loss_fn: LossFn,
    optimizer: OptimizerFactory,
    runtime: Runtime,
    scheduler: SchedulerFactory | None = None,
    desc: str = "train",
    **options: Any,
) -> list[float]:
    """:func:`train_epochs` with a fresh optimiser (and scheduler): the reference rebuilds the optimiser
    at every session (``reinit_optimizer``), so no moment estimates carry over between sessions.

    ``params``: a module (every parameter of it that requires a gradient), or the parameters or
    parameter groups to hand to ``optimizer`` as they are. ``options``: :func:`train_epochs`'s keyword
    options (``on_epoch``, ``grad_clip``, ``after_step``)."""
    opt, sched = build_optimizer(params, optimizer, scheduler)
    return train_epochs(batches, epochs, loss_fn, opt, runtime, sched, desc, **options)


def build_optimizer(
    params: nn.Module | ParamGroups, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None
) -> tuple[Optimizer, LRScheduler | None]:
    """``optimizer`` over ``params`` (a module: every parameter of it that requires a gradient; else
    the parameters or parameter groups as they are), and ``scheduler`` (if any) over that optimiser."""
    trainable = [p for p in params.parameters() if p.requires_grad] if isinstance(params, nn.Module) else list(params)
    opt = optimizer(trainable)
    return opt, scheduler(opt) if scheduler is not None else None


def slow_backbone_optimizer(
    backbone: nn.Module,
    head: nn.Module,
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None,
    backbone_lr_scale: float,
) -> tuple[Optimizer, LRScheduler | None]:
    """``optimizer`` over two groups, the backbone's trainable parameters (if any) with the learning rate
    scaled by ``backbone_lr_scale`` before the scheduler records it, then ``head``'s (SLCA's slow learner)."""
    backbone_params = [p for p in backbone.parameters() if p.requires_grad]
    groups = [{"params": list(head.parameters())}]
    if backbone_params:
        groups.insert(0, {"params": backbone_params})

    def scaled(groups: ParamGroups) -> Optimizer:
        opt = optimizer(groups)
        if backbone_params:
            opt.param_groups[0]["lr"] *= backbone_lr_scale
        return opt

    return build_optimizer(groups, scaled, scheduler)
