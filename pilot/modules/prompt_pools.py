"""Prompt pools: key-query selection (L2P, DualPrompt's E-prompts) and CODA-Prompt's components.

Every parameter here has at most 3 dimensions (the run loop converts 4-d tensors to channels-last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pilot import distributed
from pilot.modules.precision import autocast_off

log = logging.getLogger(__name__)
EPS = 1e-12  # as F.normalize / the reference's l2_normalize


def cosine_similarity(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` cosine similarities between queries ``[B, C]`` and keys ``[M, C]`` (float32 even under
    autocast, so that ties and the top-k stay exact)."""
    with autocast_off(query.device):
        return F.normalize(query.float(), dim=1, eps=EPS) @ F.normalize(keys.float(), dim=1, eps=EPS).T


def batchwise_vote(indices: torch.Tensor, pool_size: int, group_size: int | None = None) -> torch.Tensor:
    """Batch-wise prompt selection: per group of ``group_size`` consecutive samples (default: the
    whole batch), the ``k`` prompt ids chosen most often, used for every sample of the group.

    L2P's ``batchwise_prompt`` (l2p-pytorch ``Prompt.forward``): count how often each id appears in
    the per-sample top-k lists ``indices`` ``[B, k]`` and keep the ``k`` most frequent ones. Ties go
    to the smaller id (deterministic; the reference leaves them to ``torch.topk``). Voting in groups
    lets one large evaluation batch reproduce the votes of the reference's small test batches
    exactly (groups = its batches). Counting is a fixed-size scatter: no host synchronisation.
    Returns ``[B, k]``.
    """
    batch, k = indices.shape
    group = torch.arange(batch, device=indices.device) // (group_size or batch)  # [B] group of each sample
    groups = int(batch + (group_size or batch) - 1) // (group_size or batch)
    counts = torch.zeros(groups * pool_size, dtype=torch.long, device=indices.device)
    counts.scatter_add_(0, (group.unsqueeze(1) * pool_size + indices).flatten(), torch.ones_like(indices.flatten()))
    if group_size is None:  # a data-parallel training batch votes as the whole global batch
        distributed.all_reduce_sum(counts)
    score = counts.view(groups, pool_size) * pool_size + torch.arange(pool_size - 1, -1, -1, device=indices.device)
    return score.topk(k, dim=1).indices[group]


def select_top_k(similarity: torch.Tensor, k: int, batchwise: bool, group_size: int | None = None) -> torch.Tensor:
    """Prompt ids ``[B, k]``: each sample's ``k`` most similar keys, or with ``batchwise`` the ``k``
    most voted ids of its group of ``group_size`` samples (:func:`batchwise_vote`)."""
    indices = similarity.topk(k, dim=1).indices
    if batchwise:
        indices = batchwise_vote(indices, similarity.shape[1], group_size)
    return indices


def surrogate_similarity(similarity: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The key-query "pull" term of L2P/DualPrompt (Wang et al., CVPR 2022, Eq. 5; l2p-pytorch ``reduce_sim``)::

        S = (1/B) sum_b sum_{j in K_b} cos(q_b, k_j)

    with ``K_b`` the ids selected for sample ``b``. The training loss is ``CE - lambda * S``
    (``lambda`` = ``pull_coeff``, 0.1 in the reference), which pulls the selected keys to the queries.
    """
    return similarity.gather(1, indices).sum() / similarity.shape[0]


def vote_aligned_batch_size(eval_batch_size: int, vote_batch_size: int) -> int:
    """The evaluation batch rounded down to a multiple of the vote group (at least one group), so
    that groups of ``vote_batch_size`` consecutive class-sorted test samples are exactly the
    reference's test batches while the GPU sees large batches."""
    return max(vote_batch_size, eval_batch_size // vote_batch_size * vote_batch_size)


@dataclass
class PromptSelection:
    indices: torch.Tensor  # [B, k] selected pool ids
    pull: torch.Tensor  # scalar S of surrogate_similarity (differentiable w.r.t. the keys)


class PromptPool(nn.Module):
    """``pool_size`` prompts of ``tokens`` x ``dim`` with one learnable key each (L2P ``Prompt``,
    DualPrompt ``EPrompt``); prompts and keys initialised U(-1, 1) (``prompt_init``/``prompt_key_init``
    ``uniform``).

    A DualPrompt E-prompt with prefixes for several layers is one pool entry of
    ``tokens = layers x 2 (key, value) x length`` rows, split by the learner.
    """

    def __init__(self, pool_size: int, tokens: int, dim: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k={top_k} must be between 1 and the pool size {pool_size}")
        self.pool_size, self.top_k = pool_size, top_k
        self.prompts = nn.Parameter(torch.empty(pool_size, tokens, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1, 1))

    def select(
        self, query: torch.Tensor, batchwise: bool, forced: torch.Tensor | None = None, group_size: int | None = None
    ) -> PromptSelection:
        """Choose prompts for queries ``[B, C]``: cosine top-k (optionally voted per group of
        ``group_size`` samples, default the whole batch), or the ids ``forced`` ``[k]`` for every
        sample (DualPrompt's task-forced E-prompt); the pull term uses the ids actually used."""
        similarity = cosine_similarity(query, self.keys)
        if forced is not None:
            indices = forced.to(query.device).unsqueeze(0).expand(query.shape[0], -1)
        else:
            indices = select_top_k(similarity.detach(), self.top_k, batchwise, group_size)
        return PromptSelection(indices, surrogate_similarity(similarity, indices))

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Selected prompts ``[B, k, tokens, dim]``."""
        return self.prompts[indices]

    @torch.no_grad()
    def copy_slots(self, source: slice, target: slice) -> None:
        """Copy prompts (not keys) from pool slots ``source`` to ``target`` (DualPrompt ``shared_prompt_pool``)."""
        self.prompts[target] = self.prompts[source].clone()


# ----------------------------------------------------------------------------------------------- CODA
def gram_schmidt_slice(matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """CODA-Prompt's online Gram-Schmidt initialisation of rows ``[start, stop)`` (docs/methods.md §3.1).

    Returns a matrix with rows ``[0, start)`` copied, rows ``[start, stop)`` fresh Gaussian vectors
    orthogonalised (Gram-Schmidt, in this order) against all earlier rows and normalised to unit
    norm, and rows ``[stop, N)`` zero. Computed in float64 through a Householder QR of
    ``[old; new]^T`` with the signs of ``R``'s diagonal folded into ``Q`` (= classical Gram-Schmidt,
    but numerically stable, and exactly orthogonal to the span of the earlier rows even after they
    were trained away from orthogonality; the reference's loop projects on each earlier row
    separately, which is only exact while they are orthogonal). If ``stop`` exceeds the row
    dimension the rows cannot be orthogonal: they are then normalised Gaussian rows (a warning says so).
    """
    n, dim = matrix.shape
    out = torch.zeros_like(matrix)
    out[:start] = matrix[:start]
    new = torch.randn(stop - start, dim, dtype=torch.float64, device=matrix.device)
    if stop > dim:
        log.debug(
            "Gram-Schmidt: %d components do not fit in %d dimensions; components %d-%d are random unit "
            "vectors, not orthogonal (use a pool of at most %d)",
            stop,
            dim,
            start,
            stop - 1,
            dim,
        )
        out[start:stop] = F.normalize(new, dim=1).to(matrix.dtype)
        return out
    q, r = torch.linalg.qr(torch.cat([matrix[:start].double(), new]).T)
    signs = torch.sign(torch.diagonal(r)[start:])
    out[start:stop] = (q[:, start:] * signs).T.to(matrix.dtype)
    return out


def coda_weights(query: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """CODA-Prompt's component weights (Smith et al., CVPR 2023, Eq. 4; official ``CodaPrompt.forward``)::

        alpha_{l,b,k} = cos(q_b * A_{l,k}, K_{l,k})

    ``query`` ``[B, C]``, ``attention``/``keys`` ``[layers, K, C]`` -> ``[layers, B, K]``. Computed
    without materialising ``q * A`` (``[layers, B, K, C]``)::

        alpha = (q @ (A * K_hat)^T) / max(sqrt(q^2 @ (A^2)^T), eps),   K_hat = K / max(||K||, eps)
    """
    with autocast_off(query.device):
        q, a = query.float(), attention.float()
        k_hat = F.normalize(keys.float(), dim=-1, eps=EPS)
        num = torch.einsum("bc,lkc->lbk", q, a * k_hat)
        den = torch.einsum("bc,lkc->lbk", q * q, a * a).sqrt().clamp_min(EPS)
        return num / den


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """CODA's optional regulariser ``mean((M M^T - I)^2)`` for the rows ``M`` ``[K, D]`` of one layer
    (official ``ortho_penalty``; the identity is built on the rows' device)."""
    gram = rows @ rows.T
    return (gram - torch.eye(rows.shape[0], device=rows.device, dtype=gram.dtype)).pow(2).mean()


class CodaPromptPool(nn.Module):
    """CODA-Prompt's prompt components for ``layers`` blocks (docs/methods.md §3.1).

    Per layer ``l``: components ``P_l`` ``[pool, length * dim]`` (each a ``length x dim`` prompt,
    stored flattened as Gram-Schmidt sees it), keys ``K_l`` and attention vectors ``A_l``
    ``[pool, dim]``. Session ``t`` owns the slice ``[t * per_session, (t+1) * per_session)``;
    :meth:`begin_session` initialises it (zeros beyond it). The prompt of a query ``q`` is
    ``sum_k alpha_k P_k`` over the components learned so far; during training the earlier slices
    are detached, so only the current slice receives gradients.
    """

    def __init__(self, layers: int, pool_size: int, length: int, dim: int, num_sessions: int) -> None:
        super().__init__()
        self.per_session = pool_size // num_sessions
        if self.per_session < 1:
            raise ValueError(f"CODA pool of {pool_size} components cannot give one to each of {num_sessions} sessions")
        if length % 2:
            raise ValueError(f"CODA prompt length {length} must be even (half key, half value prefixes)")
        self.length, self.dim = length, dim
        if self.per_session * num_sessions > dim:
            log.warning(
                "CODA: %d components per session x %d sessions exceed the key width %d, so they cannot all be "
                "orthogonal: a session slice that ends beyond %d is initialised with random unit vectors "
                "instead of Gram-Schmidt (use pool_size <= %d)",
                self.per_session,
                num_sessions,
                dim,
                dim,
                dim,
            )
        self.prompts = nn.Parameter(torch.zeros(layers, pool_size, length * dim))
        self.keys = nn.Parameter(torch.zeros(layers, pool_size, dim))
        self.attention = nn.Parameter(torch.zeros(layers, pool_size, dim))
        self.session = -1

    def slice(self, session: int) -> tuple[int, int]:
        """Component rows ``[start, stop)`` owned by ``session``."""
        return session * self.per_session, (session + 1) * self.per_session

    @torch.no_grad()
    def begin_session(self, session: int) -> None:
        """Gram-Schmidt initialisation of the session's slice in every layer (old slices unchanged)."""
        self.session = session
        start, stop = self.slice(session)
        for tensor in (self.keys, self.attention, self.prompts):
            for layer in range(tensor.shape[0]):
                tensor[layer] = gram_schmidt_slice(tensor[layer], start, stop)

    def _active(self, tensor: torch.Tensor, train: bool) -> torch.Tensor:
        start, stop = self.slice(self.session)
        if not train:
            return tensor[:, :stop]
        return torch.cat([tensor[:, :start].detach(), tensor[:, start:stop]], dim=1)

    def forward(self, query: torch.Tensor, train: bool, ortho_mu: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts ``[layers, B, length, dim]`` for queries ``[B, dim]``, and ``ortho_mu`` times the
        orthogonality penalty of the active K, A and P (zero unless training with ``ortho_mu > 0``)."""
        keys, attention, prompts = (self._active(t, train) for t in (self.keys, self.attention, self.prompts))
        alpha = coda_weights(query, attention, keys)  # [layers, B, active]
        with autocast_off(query.device):
            mixed = torch.bmm(alpha, prompts.float())  # [layers, B, length * dim]
        penalty = query.new_zeros((), dtype=torch.float32)
        if train and ortho_mu > 0:
            for layer in range(keys.shape[0]):
                penalty = penalty + sum(orthogonality_penalty(t[layer].float()) for t in (keys, attention, prompts))
            penalty = ortho_mu * penalty
        return mixed.view(*mixed.shape[:2], self.length, self.dim), penalty
