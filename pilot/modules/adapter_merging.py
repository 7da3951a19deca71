"""Per-task adapter snapshots: momentum merging and self-refined retrieval (MOS; Sun et al., "MOS:
Model Surgery for Pre-Trained Model-Based Class-Incremental Learning", AAAI 2025; LAMDA-PILOT
``backbone/vit_mos.py`` ``adapter_merge``/``reweight_adapter``/``sum_adapter_param`` and ``models/mos.py``
``_eval_cnn``; docs/methods.md §7).

**Merging.** Session t keeps a snapshot ``S_t`` of the adapter set it trained (taken when its training
ends). The adapter set with id t >= 1 is pulled toward the mean of the earlier snapshots, parameter by
parameter (down/up weights and biases of every block)::

    A_t <- (1 - m) * A_t + m * (S_0 + ... + S_{t-1}) / t          (m = adapter_momentum = 0.1)

The mean comes from prefix sums ``P_k = S_0 + ... + S_k`` (as the reference keeps them), so
``target(t) = P_{t-1} / t``; the sums never change once written. Adapter id 0 has no target. The merge
runs after every optimiser step (:func:`after_each_step`).

**The reference's forward merges** (:meth:`AdapterHistory.forward_merges`, ``adapter_drift`` in
:mod:`pilot.learners.mos`). The reference also merges in place inside every forward pass through an
adapter id t >= 1, at train and test time: before each of the D blocks runs, it merges the adapters of
*all* D blocks once. Block l's adapter therefore runs after l + 1 merges, and after the pass every
adapter of the set has been merged D times (12 for ViT-B: 0.9^12 = 0.28 of its distance to the target
is left). Here: ``"before"`` gives block l its l + 1 merges, ``"after"`` the remaining D - l - 1
(in training: after the backward pass, before the optimiser step; autograd then sees the values the
blocks used, as in the reference, which swaps ``.data``).

**Self-refined retrieval** (:func:`self_refined_logits`): a first task guess per sample (MOS: from
prototype logits); then, up to ``rounds`` times, the head logits under the guessed task's adapter give
a new guess (the task of their argmax), until the guess stops changing.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, cast

import torch
from torch import nn
from torch.optim import Optimizer

from pilot.backbones.adapters import AdapterSet
from pilot.learners.training import OptimizerFactory, ParamGroups


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """All parameters of ``module`` in ``parameters()`` order, as one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@torch.no_grad()
def merge_toward(module: nn.Module, target: torch.Tensor, momentum: float, times: int | Sequence[int] = 1) -> None:
    """In place, k merges ``p <- (1 - momentum) * p + momentum * target`` of every parameter ``p`` of
    ``module`` (``target`` laid out as :func:`flat_parameters`), in closed form::

        p <- (1 - momentum)^k * p + (1 - (1 - momentum)^k) * target

    ``times``: k for every parameter, or one k per parameter. Also valid under inference mode (the
    parameters stay ordinary tensors). Two fused ``_foreach`` updates, whatever the number of tensors."""
    params: list[torch.Tensor] = list(module.parameters())
    if target.numel() != sum(p.numel() for p in params):
        raise ValueError(f"merge target has {target.numel()} values for {sum(p.numel() for p in params)} parameters")
    counts = [times] * len(params) if isinstance(times, int) else list(times)
    keep = [(1 - momentum) ** k for k in counts]
    parts = [part.view_as(p).to(p.dtype) for part, p in zip(target.split([p.numel() for p in params]), params)]
    torch._foreach_mul_(params, keep)
    torch._foreach_add_(params, list(torch._foreach_mul(parts, [1 - k for k in keep])))


class AdapterHistory(nn.Module):
    """Prefix sums of the adapter snapshots of the sessions so far (a ``[sessions, P]`` float32
    buffer, so in ``state_dict``): row k holds ``S_0 + ... + S_k``. ``template``: a module shaped as
    the snapshots (P = its number of parameters)."""

    sums: torch.Tensor

    def __init__(self, template: nn.Module) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(0, sum(p.numel() for p in template.parameters())))

    def grow(self, sessions: int) -> None:
        """Zero rows up to ``sessions`` (structure only; filled by :meth:`record`)."""
        extra = sessions - self.sums.shape[0]
        if extra > 0:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])

    @torch.no_grad()
    def record(self, session: int, snapshot: nn.Module) -> None:
        """Add the snapshot of ``session`` (its trained adapter set) to the prefix sums."""
        flat = flat_parameters(snapshot).to(self.sums)
        self.sums[session] = flat if session == 0 else self.sums[session - 1] + flat

    def target(self, adapter_id: int) -> torch.Tensor | None:
        """``(S_0 + ... + S_{id-1}) / id``, the merge target of adapter ``adapter_id``; None for id 0."""
        return self.sums[adapter_id - 1] / adapter_id if adapter_id > 0 else None

    def merge(self, adapters: nn.Module, adapter_id: int, momentum: float, times: Sequence[int] | int = 1) -> None:
        """Momentum merges of ``adapters`` (the set with id ``adapter_id``) toward its target:
        ``times`` merges of the whole set, or ``times[i]`` merges of block i's adapter."""
        target = self.target(adapter_id)
        if target is None or momentum == 0:
            return
        if not isinstance(times, int):  # per block -> per parameter
            blocks = cast(AdapterSet, adapters)
            times = [n for i, n in enumerate(times) for _ in blocks[i].parameters()]
        merge_toward(adapters, target, momentum, times)

    def forward_merges(
        self, adapters: nn.Module, adapter_id: int, momentum: float, stage: Literal["before", "after"]
    ) -> None:
        """The reference's in-place merges of one forward pass (see the module doc): ``before`` the
        pass block l's adapter l + 1 times, ``after`` it the remaining D - l - 1 times."""
        depth = len(cast(AdapterSet, adapters))
        times = [i + 1 if stage == "before" else depth - i - 1 for i in range(depth)]
        self.merge(adapters, adapter_id, momentum, times)


def after_each_step(
    optimizer: OptimizerFactory, callback: Callable[[], None], before: Callable[[], None] | None = None
) -> OptimizerFactory:
    """An optimiser factory whose optimisers call ``callback()`` after every ``step()`` (and
    ``before()``, if given, just before it): step hooks, e.g. an adapter merge after each update of
    the shared loop."""

    def build(params: ParamGroups) -> Optimizer:
        opt = optimizer(params)
        if before is not None:
            opt.register_step_pre_hook(lambda _opt, _args, _kwargs: before())
        opt.register_step_post_hook(lambda _opt, _args, _kwargs: callback())
        return opt

    return build


def self_refined_logits(
    first_task: torch.Tensor,
    logits_under: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    class_task: torch.Tensor,
    rounds: int = 4,
) -> torch.Tensor:
    """Self-refined adapter retrieval (reference ``_eval_cnn``). ``first_task`` ``[B]``: a_0 per sample;
    ``logits_under(rows, tasks)``: head logits ``[len(rows), C]`` of samples ``rows`` under the adapters
    of ``tasks``; ``class_task`` ``[C]``: session of each class. Round k scores every sample still
    moving under a_{k-1} and sets a_k = task(argmax); a sample stops when a_k = a_{k-1} or after
    ``rounds`` rounds. Returns the logits of each sample's last round ``[B, C]``."""
    task = first_task.clone()
    rows = torch.arange(len(task), device=task.device)
    out: torch.Tensor | None = None
    for k in range(rounds):
        logits = logits_under(rows, task[rows])
        out = logits.new_empty(len(task), logits.shape[1]) if out is None else out
        out[rows] = logits
        new = class_task[logits.argmax(dim=1)]
        moved = new != task[rows]
        if k + 1 == rounds or not bool(moved.any()):
            break
        rows = rows[moved]
        task[rows] = new[moved]
    assert out is not None
    return out


class SelectedFeatures:
    """Features of one batch under adapter sets selected per sample, each (set, sample) pair computed
    once, when first asked for: ``features(rows, ids)`` is ``[len(rows), D]``, row i = sample ``rows[i]``
    under set ``ids[i]``. ``compute(j, rows)``: the features of samples ``rows`` under set j."""

    def __init__(self, compute: Callable[[int, torch.Tensor], torch.Tensor], size: int) -> None:
        self.compute, self.size = compute, size
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # set -> (features [size, D], known [size])

    def put(self, j: int, features: torch.Tensor) -> None:
        """Features of every sample under set j, already known."""
        self.values[j] = (features, torch.ones(len(features), dtype=torch.bool, device=features.device))

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for j in ids.unique().tolist():
            pick = ids == j
            feats = self._get(int(j), rows[pick])
            out = feats.new_empty(len(rows), feats.shape[1]) if out is None else out
            out[pick] = feats
        assert out is not None, "no rows"
        return out

    def _get(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        if j not in self.values:
            fresh = self.compute(j, rows)
            feats = fresh.new_empty(self.size, fresh.shape[1])
            known = torch.zeros(self.size, dtype=torch.bool, device=rows.device)
            feats[rows], known[rows] = fresh, True
            self.values[j] = (feats, known)
            return fresh
        feats, known = self.values[j]
        missing = rows[~known[rows]]
        if len(missing):
            feats[missing], known[missing] = self.compute(j, missing), True
        return feats[rows]
