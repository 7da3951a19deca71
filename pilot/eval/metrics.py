"""Continual-learning metrics, each a function of the accuracy matrix.

Notation: ``R[k, j]`` = top-1 accuracy (percent) on the test data of the classes of session ``j``
after training session ``k``, defined for ``j <= k`` (NaN above the diagonal); ``n[j]`` = number of
test samples of session ``j``'s classes. Every function returns one value per session ``k`` (a
vector of length ``K``); NaN where the metric is undefined (e.g. forgetting after the first session).
"""

from __future__ import annotations

import numpy as np


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square [K, K], got shape {R.shape}")
    return R


def accuracy(R: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sample-weighted top-1 on all seen classes after session k (the ``A_k`` of the papers):

        A_k = sum_{j<=k} n_j R[k, j] / sum_{j<=k} n_j

    It equals the plain top-1 over every seen test image, as logged by PyCIL/LAMDA-PILOT
    (docs/methods.md §0.3); it is not a class-mean accuracy when classes are imbalanced.
    """
    R, n = _check(R), np.asarray(n, dtype=np.float64)
    out = np.empty(len(R))
    for k in range(len(R)):
        out[k] = np.dot(n[: k + 1], R[k, : k + 1]) / n[: k + 1].sum()
    return out


def average_incremental_accuracy(A: np.ndarray) -> np.ndarray:
    """Average incremental accuracy up to session k (Rebuffi et al., iCaRL, CVPR 2017):

        Abar_k = (1 / (k + 1)) sum_{i<=k} A_i

    The last element is the paper's ``Abar`` / ``A_avg``; the last ``A_k`` is ``A_last`` (``A_B``).
    """
    A = np.asarray(A, dtype=np.float64)
    return np.cumsum(A) / np.arange(1, len(A) + 1)


def forgetting(R: np.ndarray) -> np.ndarray:
    """Average forgetting after session k (Chaudhry et al., Riemannian Walk, ECCV 2018):

        F_k = (1 / k) sum_{j<k} [ max_{l in [j, k-1]} R[l, j] - R[k, j] ]

    i.e. how far each earlier session's accuracy has fallen below its best past value; negative
    when old sessions improved. NaN for k = 0.
    """
    R = _check(R)
    out = np.full(len(R), np.nan)
    for k in range(1, len(R)):
        best_past = np.array([np.max(R[j:k, j]) for j in range(k)])
        out[k] = np.mean(best_past - R[k, :k])
    return out


def backward_transfer(R: np.ndarray) -> np.ndarray:
    """Backward transfer after session k (Lopez-Paz & Ranzato, GEM, NeurIPS 2017):

        BWT_k = (1 / k) sum_{j<k} ( R[k, j] - R[j, j] )

    negative when learning new sessions hurts old ones. NaN for k = 0.
    """
    R = _check(R)
    out = np.full(len(R), np.nan)
    for k in range(1, len(R)):
        out[k] = np.mean(R[k, :k] - np.diag(R)[:k])
    return out


def old_accuracy(R: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sample-weighted top-1 after session k on the classes learned before it:

    A^old_k = sum_{j<k} n_j R[k, j] / sum_{j<k} n_j       (NaN for k = 0)
    """
    R, n = _check(R), np.asarray(n, dtype=np.float64)
    out = np.full(len(R), np.nan)
    for k in range(1, len(R)):
        out[k] = np.dot(n[:k], R[k, :k]) / n[:k].sum()
    return out


def new_accuracy(R: np.ndarray) -> np.ndarray:
    """Top-1 after session k on the classes of session k itself: ``A^new_k = R[k, k]``."""
    return np.diag(_check(R)).copy()
