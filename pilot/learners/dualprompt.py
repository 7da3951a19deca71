"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning", ECCV 2022), as LAMDA-PILOT runs it (docs/methods.md §2).

    frozen ViT f, G-prompt (layers 0-1), E-prompt pool {(k_i, E_i)} (layers 2-4), shared head g
    at the start of session t > 0:  E_t <- E_{t-1}                  # shared_prompt_pool (keys not copied)
    for each batch (x, y) of session t:
        q  = f(x)[CLS]                                         # frozen query, no grad
        i  = t                                                 # task-forced E-prompt (use_prompt_mask)
        z  = f(x; prefixes G in layers 0-1, E_i in layers 2-4)  # prefix tuning: extra keys and values
        L  = CE(mask_old(g(z[CLS])), y) - 0.1 * cos(q, k_i)
    predict: i = argmax_i cos(q, k_i), batch-wise majority vote if enabled; logits over seen classes.

If the pool is smaller than ``sessions x top_k``, the reference silently stops forcing (and copying)
E-prompts for the sessions beyond it. We refuse that at construction (:meth:`DualPrompt.check_requirements`)
unless ``allow_short_pool=true``, which reproduces the fallback with a warning.

``reference_prefix_layout`` (default off): E-prefixes laid out as LAMDA-PILOT lays them out, which
mixes the key and value prefixes of neighbouring samples of a batch (:func:`reference_e_layout`,
docs/methods.md §2.1); off gives the paper's separate key and value prefixes per sample.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pilot import distributed
from pilot.backbones.backbone import Backbone
from pilot.backbones.prompted_vit import Prefix
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError
from pilot.learners.base import LearnerSetup
from pilot.learners.prompt_pool_learner import PromptPoolLearner
from pilot.modules.classifiers import linear_head
from pilot.modules.prompt_pools import PromptPool
from pilot.registry import register_learner
from pilot.schema import NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


def reference_e_layout(e: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """LAMDA-PILOT's E-prefix layout (docs/methods.md §2.1), applied per batch of ``group_size``
    consecutive samples (default: the whole batch; a last smaller group is its own batch).

    ``e`` ``[layers, 2 (key, value), n, K, C]`` holds each sample's own key and value prefixes
    (``K = top_k x length``). The reference indexes its pool into this order and *reshapes* it,
    without a permute, to ``[layers, n, 2, K, C]``, then reads ``[:, b, 0]`` as sample ``b``'s key
    prefix and ``[:, b, 1]`` as its value prefix. Numbering the ``2n`` blocks of ``K`` rows in
    memory order ``c = r * n + j`` (row ``r`` of sample ``j``), sample ``b`` therefore receives::

        key   = block 2b      = row (2b) // n     of sample (2b) mod n
        value = block 2b + 1  = row (2b + 1) // n of sample (2b + 1) mod n

    i.e. for ``b < n/2`` the key rows of samples ``2b`` and ``2b + 1``, for ``b >= n/2`` the value
    rows of samples ``2b - n`` and ``2b - n + 1`` (odd ``n``: the middle sample gets the key rows of
    sample ``n - 1`` and the value rows of sample 0). Returns ``[layers, 2, n, K, C]`` like ``e``.
    """
    layers, _, n, K, C = e.shape
    g = min(group_size or n, n)
    full = n // g * g  # samples in whole groups; the rest form one smaller group

    def layout(x: torch.Tensor, groups: int, size: int) -> torch.Tensor:  # [layers, 2, groups * size, K, C]
        x = x.reshape(layers, 2, groups, size, K, C).transpose(1, 2)  # each group's own [layers, 2, size, K, C]
        return x.reshape(layers, groups * size, 2, K, C).transpose(1, 2)  # the reference's reshape, per group

    parts = [layout(e[:, :, :full], full // g, g)]
    if full < n:
        parts.append(layout(e[:, :, full:], 1, n - full))
    return torch.cat(parts, dim=2)


@register_learner("dualprompt")
class DualPrompt(PromptPoolLearner):
    """Shared G-prefixes, a pool of E-prefixes selected by key, one linear head on CLS."""

    g_prompt_layers: Sequence[NonNegativeInt] = (0, 1)
    g_prompt_length: PositiveInt = 5
    e_prompt_layers: Sequence[NonNegativeInt] = (2, 3, 4)
    e_prompt_length: PositiveInt = 5
    top_k: PositiveInt = 1  # the pool's other settings: PromptPoolLearner
    vote_batch_size: PositiveInt = 24
    task_forced_prompt: bool = True
    copy_previous_prompt: bool = True
    reference_prefix_layout: bool = False
    allow_short_pool: bool = False

    def __init__(self, setup: LearnerSetup, **settings: Any) -> None:
        super().__init__(setup, **settings)
        dim = self.vit.dim
        # G-prompt: per layer [key prefix; value prefix] rows, U(-1, 1).
        self.g_prompt = nn.Parameter(
            torch.empty(len(self.g_prompt_layers), 2 * self.g_prompt_length, dim).uniform_(-1, 1)
        )
        # E-prompt pool: one entry = for each E layer [key prefix; value prefix] rows.
        self.e_pool = PromptPool(self.pool_size, len(self.e_prompt_layers) * 2 * self.e_prompt_length, dim, self.top_k)
        self.head = linear_head(dim, self.scenario.num_classes)
        self.session = 0
        covered = self.e_pool.pool_size // self.top_k
        if (self.task_forced_prompt or self.copy_previous_prompt) and self.scenario.num_sessions > covered:
            log.warning(
                "DualPrompt: the E-prompt pool (%d prompts, top_k %d) has task slots for %d sessions, but the scenario "
                "has %d. As in the reference, sessions %d-%d train without a task-forced E-prompt (selection by key "
                "matching instead) and without copying the previous prompt.",
                self.e_pool.pool_size,
                self.top_k,
                covered,
                self.scenario.num_sessions,
                covered,
                self.scenario.num_sessions - 1,
            )

    def prefix_layers(self) -> list[int]:
        return [*self.g_prompt_layers, *self.e_prompt_layers]

    @classmethod
    def check_requirements(cls, backbone: Backbone, scenario: Scenario, params: Mapping[str, Any]) -> None:
        """Besides the common checks: with task-forced E-prompts the pool needs one slot of ``top_k``
        prompts per session (session ``t`` trains prompts ``[t * top_k, (t + 1) * top_k)``).

        With a shorter pool the reference silently trains the later sessions on whichever prompts
        the keys select, a different method whose numbers are not comparable; a too-small pool is
        almost always an oversight when moving to a longer scenario, so it is refused unless
        ``allow_short_pool=true`` (the reference's fallback, with a warning).
        """
        super().check_requirements(backbone, scenario, params)
        g_layers, e_layers = list(params["g_prompt_layers"]), list(params["e_prompt_layers"])
        if set(g_layers) & set(e_layers):
            raise ConfigError(
                f"method.g_prompt_layers {g_layers} and method.e_prompt_layers {e_layers} "
                "overlap; a block takes either the G- or the E-prompt"
            )
        if params["reference_prefix_layout"] and distributed.active():
            raise ConfigError(
                "method.reference_prefix_layout=true mixes the prefixes of the samples of a training batch, which a "
                "data-parallel run splits over processes. Run it in one process, or set "
                "method.reference_prefix_layout=false."
            )
        if not params["task_forced_prompt"] or params["allow_short_pool"]:
            return
        pool_size, top_k, sessions = int(params["pool_size"]), int(params["top_k"]), scenario.num_sessions
        if pool_size < sessions * top_k:
            raise ConfigError(
                f"method.pool_size={pool_size} with method.top_k={top_k} holds task prompts for {pool_size // top_k} "
                f"sessions, but scenario {scenario.name} has {sessions}: with method.task_forced_prompt=true, "
                f"sessions {pool_size // top_k}-{sessions - 1} would train without a prompt of their own. Raise "
                f"method.pool_size to >= {sessions * top_k} (sessions x top_k), set method.task_forced_prompt=false "
                "(prompts chosen by key matching in every session), or set method.allow_short_pool=true to accept "
                "the reference's fallback."
            )

    def task_slots(self, session: int) -> slice | None:
        """Pool ids of ``session``'s E-prompt (``[t*k, (t+1)*k)``), or None where the pool has no room."""
        start, stop = session * self.top_k, (session + 1) * self.top_k
        return slice(start, stop) if stop <= self.e_pool.pool_size else None

    def begin_session(self, info: SessionInfo) -> None:
        super().begin_session(info)
        self.session = info.index
        if self.copy_previous_prompt and info.index > 0:
            previous, current = self.task_slots(info.index - 1), self.task_slots(info.index)
            if previous is not None and current is not None:
                self.e_pool.copy_slots(previous, current)

    def prefixes(self, indices: torch.Tensor, group_size: int | None = None) -> dict[int, Prefix]:
        """Key/value prefixes per block: the G-prompt, and the E-prompts ``indices`` ``[B, k]``
        (the ``k`` prompts' prefixes concatenated). With ``reference_prefix_layout`` the E-prefixes
        follow :func:`reference_e_layout` within each batch of ``group_size`` samples (None: all ``B``)."""
        L = self.g_prompt_length
        prefixes = {
            layer: (self.g_prompt[i, None, :L], self.g_prompt[i, None, L:])
            for i, layer in enumerate(self.g_prompt_layers)
        }
        B, k = indices.shape
        e = self.e_pool.gather(indices).view(B, k, len(self.e_prompt_layers), 2, self.e_prompt_length, -1)
        e = e.permute(2, 3, 0, 1, 4, 5).flatten(3, 4)  # [layers, k/v, B, k * length, C]
        if self.reference_prefix_layout:
            e = reference_e_layout(e, group_size)
        prefixes.update({layer: (e[i, 0], e[i, 1]) for i, layer in enumerate(self.e_prompt_layers)})
        return prefixes

    def logits(self, images: torch.Tensor, indices: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        features = self.vit.forward_features(images, prefixes=self.prefixes(indices, group_size))
        return self.head(self.vit.pooled(features))

    @property
    def pool(self) -> PromptPool:  # type: ignore[override]
        """The pool selected by key: the E-prompts."""
        return self.e_pool

    def forced_prompts(self, device: torch.device) -> torch.Tensor | None:
        """During training session t every sample uses E-prompt t (``use_prompt_mask``), where the pool has room."""
        slots = self.task_slots(self.session) if self.task_forced_prompt else None
        return None if slots is None else torch.arange(slots.start, slots.stop, device=device)
