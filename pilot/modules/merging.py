"""Weight-space model merging (CoFiMA, DUCT): interpolation, Fisher-weighted averaging, task vectors,
the diagonal Fisher estimate, and DUCT's optimal-transport classifier consolidation.

Every formula acts element-wise on tensors of the same shape (one parameter, or all parameters
flattened into one vector with :func:`flatten`):

* **Interpolation** (CoMA: Marouf et al., "Weighted Ensemble Models Are Strong Continual Learners",
  ECCV 2024; LAMDA-PILOT ``models/cofima.py: interpolate_weights(fisher=False)``)::

      theta = (1 - alpha) * theta_old + alpha * theta_new

  An exponential moving average ``theta <- beta * theta + (1 - beta) * theta_new`` is the same with
  ``alpha = 1 - beta``.
* **Fisher-weighted averaging** (CoFiMA, same paper and file, ``fisher=True``)::

      theta = ((1 - alpha) F_old theta_old + alpha F_new theta_new) / ((1 - alpha) F_old + alpha F_new)

  Where both Fisher values are 0 the quotient is 0/0 (the reference returns NaN); we take the
  plain interpolation there, the limit of equal small Fisher values.
* **Task vectors** (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023; DUCT: Zhou et al.,
  "Dual Consolidation for Pre-Trained Model-Based Domain-Incremental Learning", CVPR 2025;
  LAMDA-PILOT ``models/duct.py: _stage1_merge_backbone``)::

      theta = theta_base + scale * (theta_finetuned - theta_pretrained)

* **Diagonal empirical Fisher** (LAMDA-PILOT ``models/cofima.py: getFisherDiagonal``): one pass over
  B batches, the squared gradient of each batch's mean loss, averaged and clipped::

      F = min((1 / B) sum_b (dL_b / dtheta)^2, F_max)          (F_max = 1e-4 in the reference)

* **Classifier transport** (DUCT, ``_stage2_transport_classifier``): the entropic optimal transport plan
  T between the new and an old session's classes, with uniform marginals and the Euclidean distances
  of their class means as cost, carries the new classifier rows to the old classes::

      W_old <- (1 - r) W_old + r T^T W_new

  T comes from the Sinkhorn-Knopp iterations of POT's ``ot.sinkhorn`` (Cuturi, NeurIPS 2013), written
  out in :func:`sinkhorn` with the same start, update order, stopping test and fallback, so plans
  match POT's (which LAMDA-PILOT imports; it is not a dependency here).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


# ----------------------------------------------------------------------------------- flat vectors
def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, in order, as one float32 vector (a copy; any memory layout)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


@torch.no_grad()
def unflatten_(vector: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Write ``vector`` back into ``tensors`` (the inverse of :func:`flatten`)."""
    offset = 0
    for t in tensors:
        t.copy_(vector[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the tensors {offset}")


def floating_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every floating-point parameter and buffer of ``module`` (its state dict less integer counters)."""
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


# ---------------------------------------------------------------------------------------- merging
def interpolate(theta_old: torch.Tensor, theta_new: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) theta_old + alpha theta_new`` (CoMA; an EMA with ``alpha = 1 - beta``)."""
    return (1 - alpha) * theta_old + alpha * theta_new


def fisher_weighted_average(
    theta_old: torch.Tensor, theta_new: torch.Tensor, fisher_old: torch.Tensor, fisher_new: torch.Tensor, alpha: float
) -> torch.Tensor:
    """CoFiMA's ``((1-a) F_old theta_old + a F_new theta_new) / ((1-a) F_old + a F_new)``; the plain
    interpolation where both Fisher values are 0."""
    total = (1 - alpha) * fisher_old + alpha * fisher_new
    weighted = (1 - alpha) * (fisher_old * theta_old) + alpha * (fisher_new * theta_new)
    merged = weighted / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, merged, interpolate(theta_old, theta_new, alpha))


def add_task_vector(
    base: torch.Tensor, finetuned: torch.Tensor, pretrained: torch.Tensor, scale: float
) -> torch.Tensor:
    """``base + scale * (finetuned - pretrained)``: task arithmetic (DUCT's representation merge)."""
    return base + scale * (finetuned - pretrained)


def diagonal_fisher(
    params: Sequence[torch.Tensor], losses: Iterable[torch.Tensor], max_value: float | None = None
) -> list[torch.Tensor]:
    """``min(mean over the losses of (dL/dp)^2, max_value)`` for every tensor of ``params``.

    ``losses``: one scalar per batch (the batch-mean loss), e.g. a generator that runs the forward
    passes. A parameter a loss does not reach contributes 0 for that batch."""
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for total, grad in zip(sums, grads):
            if grad is not None:
                total += grad.float().square()
        count += 1
    fisher = [total / max(count, 1) for total in sums]
    return [f.clamp_max(max_value) for f in fisher] if max_value is not None else fisher


# --------------------------------------------------------------------------- classifier transport
def sinkhorn(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9
) -> torch.Tensor:
    """Entropic OT plan ``diag(u) K diag(v)``, ``K = exp(-cost / reg)``, with row sums ``a`` and column
    sums ``b`` (float64), by Sinkhorn-Knopp as POT's ``ot.sinkhorn`` (defaults 1000 iterations, 1e-9).

    From ``u = 1/n_a``, ``v = 1/n_b``: ``v = b / (K^T u)``, then ``u = 1 / ((K / a) v)``; every 10th
    iteration stops once ``||column sums - b|| < tol``. Should an update hit a zero, NaN or inf
    (costs far above ``reg`` underflow ``K``), the previous ``u, v`` are kept and the loop ends."""
    a, b, cost = a.double(), b.double(), cost.double()
    u = torch.full_like(a, 1.0 / a.numel())
    v = torch.full_like(b, 1.0 / b.numel())
    kernel = torch.exp(cost / -reg)
    scaled = (1.0 / a).unsqueeze(1) * kernel
    for step in range(max_iter):
        previous = u, v
        column = kernel.T @ u
        v = b / column
        u = 1.0 / (scaled @ v)
        if (column == 0).any() or not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            u, v = previous
            break
        if step % 10 == 0 and torch.linalg.vector_norm((u @ kernel) * v - b) < tol:
            break
    return u.unsqueeze(1) * kernel * v.unsqueeze(0)


def transport_classifier(
    weight_old: torch.Tensor,
    weight_new: torch.Tensor,
    means_old: torch.Tensor,
    means_new: torch.Tensor,
    ratio: float,
    reg: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DUCT's classifier consolidation of one old session: ``(1 - ratio) W_old + ratio T^T W_new`` and T.

    ``T`` ``[n_new, n_old]``: :func:`sinkhorn` with uniform marginals and the cost
    ``||mu_new_i - mu_old_j||_2`` between class means (float64). The rows are mixed as they are, not
    normalised (as the reference), so each transported row carries weight ``1/n_old`` of the new rows."""
    cost = torch.cdist(means_new.double(), means_old.double())
    n_new, n_old = cost.shape
    a = torch.full((n_new,), 1.0 / n_new, dtype=torch.float64, device=cost.device)
    b = torch.full((n_old,), 1.0 / n_old, dtype=torch.float64, device=cost.device)
    plan = sinkhorn(a, b, cost, reg)
    transported = (plan.T @ weight_new.double()).to(weight_old.dtype)
    return (1 - ratio) * weight_old + ratio * transported, plan
