"""Resume points: written atomically after every finished session.

Checkpoints hold only tensors and plain data (str, int, float, bool, None, lists, tuples, dicts), so
:func:`load_checkpoint` reads them with ``torch.load(..., weights_only=True)``: loading a checkpoint never
runs code from the file. Checkpoints written before this (pilot 0.1.0 without the change) also hold
numpy arrays (the numpy RNG state and the evaluator's matrices) and numpy scalars (the history); they
still load with ``weights_only=True`` through an allow-list of exactly those numpy classes
(:data:`LEGACY_NUMPY_GLOBALS`), and anything else in a file is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pilot.errors import CheckpointError
from pilot.rundir import CHECKPOINT_FILE

# What every checkpoint written by the run loop holds.
CHECKPOINT_KEYS = ("run_id", "sessions_done", "learner", "evaluator", "history", "rng")


# The numpy classes that checkpoints written before they held only tensors and plain data need
# (numpy arrays and scalars pickle through these); allowed when loading with weights_only=True.
# numpy 2 pickles them under numpy._core, numpy 1 under numpy.core: both names are allowed.
_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy._core.multiarray._reconstruct (not in the stubs)
_scalar = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar
LEGACY_NUMPY_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    _reconstruct,
    _scalar,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_scalar, "numpy.core.multiarray.scalar"),
    *(type(np.dtype(code)) for code in ("float64", "float32", "int64", "int32", "uint32", "bool")),
]


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, numpy's global RNG, torch CPU and CUDA; as tensors and plain
    data (numpy's key array as a list of ints) so that the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached_gaussian = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]  # keys: a list, or an array in old checkpoints
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA), as the reference does per seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``run_dir/checkpoint.pt`` through a temporary file and an atomic rename,
    so an interruption leaves either the previous checkpoint or the new one, never a torn file."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` (None if there is none). A file that cannot be read, or that
    is not a run loop's checkpoint, raises :class:`CheckpointError` naming it and the way out."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        # weights_only=True: the file's pickle may build tensors, plain data and the numpy classes of
        # older checkpoints, nothing else, so that a planted or foreign file cannot run code.
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # A weights-only load also answers a torn or garbage file with an UnpicklingError: only a file
        # that names classes or functions is one that holds something a pilot checkpoint does not.
        unsafe = _unsafe_globals(path)
        problem = f"it holds objects that a pilot checkpoint does not ({unsafe})" if unsafe else None
        raise CheckpointError(
            _unusable(path, problem or f"the file is truncated or damaged ({_first_line(err)})")
        ) from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError... for a torn file
        raise CheckpointError(_unusable(path, f"the file is truncated or damaged ({_first_line(err)})")) from err
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(_unusable(path, f"it is not a pilot checkpoint (no {', '.join(missing)})"))
    state["history"] = _plain(state["history"])  # numpy scalars in older checkpoints
    return state


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars replaced by Python numbers, through lists, tuples and dicts."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _unusable(path: Path, problem: str) -> str:
    return (
        f"{path} cannot be used: {problem}, so its run cannot be resumed. Restore the file from a backup, "
        f"or start again with overwrite=true (deletes the results in {path.parent}), or choose another hydra.run.dir."
    )


def _unsafe_globals(path: Path) -> str:
    """The classes and functions in ``path`` that a weights-only load refuses ("" if none can be read)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only for the message; a torn file has none to name
        return ""
    return ", ".join(names)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
