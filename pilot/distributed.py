"""Data-parallel runs: one CIL sequence over N processes (``torchrun --nproc_per_node=N -m pilot.train ...``).

Nothing here is specific to a method; learners need no distributed code. The rules:

* **The global batch stays the method's batch** (``batch_size`` of the config). Every rank draws the same
  global batch (same seed, same shuffling), keeps its contiguous part (:func:`shard`) and trains on it;
  gradients are weighted by the part's share of the global batch and summed over ranks
  (:func:`reduce_gradients`), which is the gradient of the global batch's mean loss::

      grad = sum_r (n_r / N) * grad_r,     grad_r = d/dθ (1/n_r) sum_{i in part r} loss_i

  ``runtime.scale_batch=true`` multiplies the global batch by the number of ranks instead (each rank then
  keeps ``batch_size`` samples; learning rates are left as configured).
* **Training augmentation is drawn for the global batch** on every rank from the shared RNG stream, then
  sliced, so a rank sees exactly the augmented images a one-process run would give those samples. The
  forward/backward of a rank runs under a forked RNG seeded per (step, rank) (:func:`rank_rng`), so
  dropout in a rank's part does not move the shared stream apart between ranks.
* **Passes over a dataset are exact**: features of every rank's parts are gathered in the global order
  (:func:`gather_in_order`), so prototypes, Gaussian statistics and Gram matrices equal a one-process run's.
* **Evaluation** scores each rank's parts; the per-session counts are summed over ranks (no sample is
  counted twice: parts never overlap and nothing is padded). A test batch is cut only at multiples of
  the learner's ``vote_batch_size`` when its predictions vote per group, so every vote group stays whole.
* **Batch-wise prompt votes in training** (L2P, DualPrompt) count votes over the global batch
  (:func:`all_reduce_sum` of the counts).
* Work that is not split (classifier alignment, small solves) runs identically on every rank from
  identical inputs; at the end of every session the learner's state is broadcast from rank 0
  (:func:`broadcast_state`) so that no rounding difference can accumulate across sessions.
* Rank 0 alone writes results, checkpoints, W&B and the run directory's files; every rank reads the
  checkpoint when resuming.

Outside torchrun (``WORLD_SIZE`` unset or 1) every function here is the identity or a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """Processes started by torchrun (``WORLD_SIZE``), 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (``env://``), once; False outside torchrun.

    ``backend``: ``nccl`` when CUDA is available, else ``gloo`` (CPU runs and tests)."""
    if env_world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    log.debug("rank %d of %d joined (%s)", rank(), world_size(), backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes (results, checkpoints, logs): rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(n: int, unit: int = 1) -> slice:
    """This rank's contiguous part of a global batch of ``n`` samples, cut only at multiples of ``unit``.

    Units are split as ``torch.tensor_split`` splits them: the first ``n_units % world`` ranks get one
    more. A rank may get an empty part when the batch has fewer units than there are ranks."""
    return _shard_of(n, unit, rank(), world_size()) if active() else slice(0, n)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_gradients(params: Iterable[nn.Parameter], weight: float) -> None:
    """``grad <- sum_r weight_r * grad_r`` for every parameter (``weight`` = this rank's share of the
    global batch). One flat all-reduce; a parameter without a gradient on this rank contributes zeros."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]) * weight
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        size = p.numel()
        p.grad = flat[offset : offset + size].view_as(p).to(p.dtype)
        offset += size


def gather_in_order(parts: list[torch.Tensor], sizes: list[slice]) -> torch.Tensor:
    """Concatenate, in global order, the rows every rank computed for its parts of a sequence of batches.

    ``parts[b]``: this rank's rows of global batch ``b``; ``sizes[b]``: the global size of batch ``b`` and
    the unit it was cut at (``slice(n, unit)``, as :func:`shard` cut it). Returns the rows of all
    batches in the order a one-process pass would produce them (identical on every rank)."""
    local = torch.cat(parts) if parts else torch.empty(0)
    if not active():
        return local
    world = world_size()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local.cpu())
    offsets = [0] * world
    rows = []
    for spec in sizes:
        n, unit = int(spec.start), int(spec.stop)
        for r in range(world):
            part = _shard_of(n, unit, r, world)
            count = part.stop - part.start
            rows.append(gathered[r][offsets[r] : offsets[r] + count])
            offsets[r] += count
    return torch.cat(rows).to(local.device) if rows else local


def _shard_of(n: int, unit: int, r: int, world: int) -> slice:
    units = -(-n // unit)
    base, extra = divmod(units, world)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return slice(min(start * unit, n), min(stop * unit, n))


def broadcast_state(module: nn.Module) -> None:
    """Copy every parameter and buffer of ``module`` from rank 0 to the other ranks."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
                continue
            dist.broadcast(tensor.data, src=0)


def broadcast_object(value: Any) -> Any:
    """``value`` of rank 0, on every rank (a small picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_rng(device: torch.device) -> Iterator[None]:
    """Inside the block, the RNGs are seeded for this (step, rank) and restored afterwards, so that what
    a rank draws for its own part (dropout) leaves the stream shared by the ranks where it was. The
    seed is a hash of the shared CPU generator's state (the same on every rank, different at every
    step) and the rank; reading the state draws nothing, so the shared stream advances exactly as in
    a one-process run."""
    if not active():
        yield
        return
    state = hashlib.blake2b(torch.random.get_rng_state().numpy().tobytes(), digest_size=8).digest()
    seed = (int.from_bytes(state, "little") + rank()) % 2**63
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def same_on_every_rank(values: Mapping[str, Any]) -> None:
    """Refuse a run whose ranks disagree on ``values`` (e.g. a seed or a config hash)."""
    if not active():
        return
    mine = dict(values)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(f"ranks disagree on {sorted(mine)}: {gathered}")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
