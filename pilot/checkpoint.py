"""Resume points: written atomically after every finished session."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pilot.errors import CheckpointError
from pilot.rundir import CHECKPOINT_FILE

# What every checkpoint written by the run loop holds.
CHECKPOINT_KEYS = ("run_id", "sessions_done", "learner", "evaluator", "history", "rng")


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, numpy's global RNG, torch CPU and CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError... for a torn file
        raise CheckpointError(_unusable(path, f"the file is truncated or damaged ({_first_line(err)})")) from err
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(_unusable(path, f"it is not a pilot checkpoint (no {', '.join(missing)})"))
    return state


def _unusable(path: Path, problem: str) -> str:
    return (
        f"{path} cannot be used: {problem}, so its run cannot be resumed. Restore the file from a backup, "
        f"or start again with overwrite=true (deletes the results in {path.parent}), or choose another hydra.run.dir."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
