"""Fills the accuracy matrix from predictions, one session row at a time, and derives the metrics.

Counts are accumulated on the device with ``bincount`` (no host synchronisation per batch) and read
back once per session. The run keeps one evaluator for the test images and, with
``scenario.val_fraction``, a second one for the held-out validation images (``split="val"``).

Learners with an exemplar memory also give nearest-mean-of-exemplars scores
(:meth:`pilot.learners.replay.ReplayLearner.predict_nme`); their hits fill a second matrix ``R_nme``
from which ``acc_nme`` (top-1 on all seen classes, as PILOT's ``nme_accy["top1"]``) and
``acc_nme_avg`` (its mean over sessions) are derived, and ``matrix.csv`` gets ``acc_nme`` per block.
Learners without NME scores leave them NaN (empty cells).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pilot import distributed
from pilot.data.scenario import Scenario
from pilot.eval import metrics

TOP_K = 5


class Evaluator:
    """Accuracy matrix ``R`` (percent) and top-5 accuracy per session for one scenario, on the images
    of ``split`` (``test`` or ``val``; it only names them in messages)."""

    def __init__(self, scenario: Scenario, device: torch.device | str = "cpu", split: str = "test") -> None:
        self.split = split
        self.num_sessions = scenario.num_sessions
        self.session_of_label = torch.as_tensor(scenario.session_of_label, device=device)
        K = self.num_sessions
        self.R = np.full((K, K), np.nan)
        self.n = np.zeros(K, dtype=np.int64)  # test samples per session block
        self.top5 = np.full(K, np.nan)
        self.R_nme = np.full((K, K), np.nan)  # the same matrix for nearest-mean-of-exemplars scores
        self.sessions_done = 0
        self._current: int | None = None

    # ------------------------------------------------------------------------- accumulation
    def start_session(self, k: int) -> None:
        self._current = k
        device = self.session_of_label.device
        self._correct = torch.zeros(self.num_sessions, dtype=torch.long, device=device)
        self._seen = torch.zeros(self.num_sessions, dtype=torch.long, device=device)
        self._correct5 = torch.zeros((), dtype=torch.long, device=device)
        self._correct_nme = torch.zeros(self.num_sessions, dtype=torch.long, device=device)
        self._nme_batches = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, nme_logits: torch.Tensor | None = None) -> None:
        """Add a batch of logits ``[B, n_seen]`` and their labels ``[B]``, and the batch's NME scores
        ``[B, n_seen]`` when the learner has them (then for every batch of the session)."""
        if self._current is None:
            raise RuntimeError("call start_session() before update()")
        block = self.session_of_label[labels]
        hit = (logits.argmax(dim=1) == labels).long()
        # Weighted bincount, not block[hit]: boolean indexing would make the host wait for the GPU.
        self._correct += torch.bincount(block, weights=hit, minlength=self.num_sessions).long()
        self._seen += torch.bincount(block, minlength=self.num_sessions)
        if nme_logits is not None:
            hit_nme = (nme_logits.argmax(dim=1) == labels).long()
            self._correct_nme += torch.bincount(block, weights=hit_nme, minlength=self.num_sessions).long()
            self._nme_batches += 1
        k = min(TOP_K, logits.shape[1])
        self._correct5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()

    def end_session(self) -> dict[str, Any]:
        """Write row ``k`` of ``R`` and return the session's metrics record."""
        k = self._current
        if k is None:
            raise RuntimeError("end_session() without start_session()")
        # Data-parallel runs: each rank scored its own parts of the test batches; add them up.
        K = self.num_sessions
        nme_batches = torch.tensor([self._nme_batches], device=self._correct.device)
        local = torch.cat([self._correct, self._seen, self._correct_nme, self._correct5.view(1), nme_batches])
        counts = distributed.all_reduce_sum(local)
        self._correct, self._seen, self._correct_nme = counts[:K], counts[K : 2 * K], counts[2 * K : 3 * K]
        self._correct5, nme_batches = counts[-2], counts[-1]
        correct, seen = self._correct.cpu().numpy(), self._seen.cpu().numpy()
        if seen[: k + 1].min() == 0:
            raise RuntimeError(
                f"session {k}: some session block had no {self.split} samples ({seen[: k + 1].tolist()})"
            )
        self.R[k, : k + 1] = 100.0 * correct[: k + 1] / seen[: k + 1]
        self.n[: k + 1] = seen[: k + 1]
        self.top5[k] = 100.0 * float(self._correct5) / seen[: k + 1].sum()
        if int(nme_batches) > 0:
            self.R_nme[k, : k + 1] = 100.0 * self._correct_nme.cpu().numpy()[: k + 1] / seen[: k + 1]
        self.sessions_done = k + 1
        self._current = None
        return self.record(k)

    # ------------------------------------------------------------------------------ metrics
    def record(self, k: int) -> dict[str, Any]:
        """All metrics after session ``k`` (percent), from the rows filled so far."""
        R, n = self.R[: k + 1, : k + 1], self.n[: k + 1]
        acc = metrics.accuracy(R, n)
        acc_nme = metrics.accuracy(self.R_nme[: k + 1, : k + 1], n)  # NaN in sessions without NME scores
        # Plain Python floats, not numpy scalars: records go into checkpoints, which load with
        # ``torch.load(..., weights_only=True)``.
        return {
            "session": k,
            "acc": float(acc[k]),
            "acc_top5": float(self.top5[k]),
            "acc_old": float(metrics.old_accuracy(R, n)[k]),
            "acc_new": float(metrics.new_accuracy(R)[k]),
            "acc_avg": float(metrics.average_incremental_accuracy(acc)[k]),
            "forgetting": float(metrics.forgetting(R)[k]),
            "bwt": float(metrics.backward_transfer(R)[k]),
            "n_test": int(n.sum()),
            "acc_nme": float(acc_nme[k]),
            "acc_nme_avg": float(metrics.average_incremental_accuracy(acc_nme)[k]),
        }

    def matrix_rows(self, k: int) -> list[dict[str, Any]]:
        """Row ``k`` of ``R`` in long form: one dict per session block ``j <= k``."""
        return [
            {
                "session": k,
                "block": j,
                "acc": float(self.R[k, j]),
                "n_test": int(self.n[j]),
                "acc_nme": float(self.R_nme[k, j]),
            }
            for j in range(k + 1)
        ]

    # ------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only, so that a checkpoint loads with ``torch.load(..., weights_only=True)``."""
        return {
            "R": torch.from_numpy(self.R.copy()),
            "n": torch.from_numpy(self.n.copy()),
            "top5": torch.from_numpy(self.top5.copy()),
            "R_nme": torch.from_numpy(self.R_nme.copy()),
            "sessions_done": self.sessions_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Tensors, or the numpy arrays of checkpoints written before the tensors.
        self.R, self.n, self.top5 = (torch.as_tensor(state[key]).numpy().copy() for key in ("R", "n", "top5"))
        # Checkpoints written before NME scores existed: no NME accuracy.
        nme = state.get("R_nme")
        self.R_nme = torch.as_tensor(nme).numpy().copy() if nme is not None else np.full_like(self.R, np.nan)
        self.sessions_done = int(state["sessions_done"])
