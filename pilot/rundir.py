"""Safety of a run directory: one run at a time, earlier results never written over, clean stops.

* :class:`RunDirLock` holds an OS-level lock (``filelock``) on the directory while a run writes it,
  with a small file beside the lock that names the holder (pid, host, start time). The kernel drops
  the lock when its process dies, so a lock file left by a killed run never blocks.
* :func:`inspect_run_dir` and :func:`check_start` decide whether a run may start in a directory:
  results of an earlier run are only continued (``resume=true``) or deleted first
  (``overwrite=true``, see :func:`clear_results`), never silently mixed with new ones.
  ``resume=auto`` continues where there is a checkpoint and starts afresh in an empty directory:
  what a job that a scheduler may requeue (SLURM, ``pilot.launch``) needs.
* :func:`interrupts_as_errors` turns Ctrl-C and SIGTERM into a :class:`RunInterruptedError` whose
  one-line message says which sessions are safe on disk and the command that resumes the run.

This module imports neither torch nor the learners, so it stays cheap to import.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Iterator, Literal

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from pilot.errors import ConfigError, ResultsExistError, ResumeError, RunDirBusyError, RunInterruptedError
from pilot.sinks.csv import EPOCHS_FILE, MATRIX_FILE, SESSIONS_FILE

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".pilot.lock"
HOLDER_FILE = ".pilot.lock.holder"
# Everything pilot itself writes into a run directory; overwrite=true deletes these and nothing else.
# Hydra's own `.hydra/` and `train.log` are left alone: Hydra has already opened the log of this run.
OWN_FILES = (
    SESSIONS_FILE,
    MATRIX_FILE,
    EPOCHS_FILE,
    CHECKPOINT_FILE,
    CHECKPOINT_FILE + ".tmp",
    "config.yaml",
    "class_order.json",
    "sessions.json",
    "wandb_id.txt",
    "memory.csv",
    "memory.csv.tmp",
)
OWN_DIRS = ("wandb",)
# Command-line keys that choose how a run starts; the resume command sets them itself.
START_KEYS = ("resume", "overwrite", "hydra.run.dir")
AUTO: Literal["auto"] = "auto"  # resume=auto: continue if there is a checkpoint, else start afresh
ResumeMode = bool | Literal["auto"]  # the values of ``resume``


# ----------------------------------------------------------------------------------------- lock


class RunDirLock:
    """Exclusive lock on a run directory, as a context manager. Acquiring never waits: if another
    run holds the directory, :class:`RunDirBusyError` names it and the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)

    def acquire(self) -> RunDirLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another pilot run{_describe_holder(self.run_dir)}. "
                "Wait for it to finish or choose another hydra.run.dir."
            ) from None
        _write_holder(self.run_dir)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()


def _write_holder(run_dir: Path) -> None:
    """Who holds the lock, for the message another run shows (written atomically)."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
    tmp = run_dir / f"{HOLDER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(holder))
    os.replace(tmp, run_dir / HOLDER_FILE)


def _describe_holder(run_dir: Path) -> str:
    """`` (pid 1234 on host, started ...)``, or nothing when the holder file is missing or unreadable."""
    try:
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
        return f" (pid {holder['pid']} on {holder['host']}, started {holder['started'].replace('T', ' ')})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


# ----------------------------------------------------------------------------- what is there


@dataclass(frozen=True)
class RunDirContents:
    """The results an earlier run left in a directory."""

    session_rows: int
    matrix_rows: int
    has_checkpoint: bool

    @property
    def has_results(self) -> bool:
        return self.session_rows > 0 or self.matrix_rows > 0 or self.has_checkpoint

    def describe(self) -> str:
        """E.g. ``sessions.csv (3 sessions), matrix.csv (6 rows), checkpoint.pt``."""
        parts = []
        if self.session_rows:
            parts.append(f"{SESSIONS_FILE} ({self.session_rows} session{'s' if self.session_rows != 1 else ''})")
        if self.matrix_rows:
            parts.append(f"{MATRIX_FILE} ({self.matrix_rows} row{'s' if self.matrix_rows != 1 else ''})")
        if self.has_checkpoint:
            parts.append(CHECKPOINT_FILE)
        return ", ".join(parts)


def inspect_run_dir(run_dir: Path) -> RunDirContents:
    """Count the result rows and look for a checkpoint (header-only CSVs hold no results)."""
    return RunDirContents(
        session_rows=_data_rows(run_dir / SESSIONS_FILE),
        matrix_rows=_data_rows(run_dir / MATRIX_FILE),
        has_checkpoint=(run_dir / CHECKPOINT_FILE).exists(),
    )


def _data_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 1  # there but unreadable: treat it as results, never as free space
    return sum(1 for line in lines[1:] if line.strip())


def read_flag(cfg: DictConfig, key: str) -> bool:
    """The top-level switch ``key`` as a real boolean; ``resume=no`` or ``overwrite=1`` are refused
    rather than read as true."""
    value: Any = cfg.get(key, False)
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value} is not a boolean: write {key}=true or {key}=false.")


def read_resume(cfg: DictConfig) -> ResumeMode:
    """``resume``: true, false, or ``"auto"`` (continue if the run directory holds a checkpoint, else
    start afresh); any other value is refused, as by :func:`read_flag`."""
    value: Any = cfg.get("resume", False)
    if isinstance(value, bool):
        return value
    if value == AUTO:
        return AUTO
    raise ConfigError(
        f"resume={value} is not a boolean: write resume=true or resume=false, or resume=auto "
        "(continue if the run directory holds a checkpoint, else start afresh)."
    )


def check_start(run_dir: Path, contents: RunDirContents, resume: ResumeMode, overwrite: bool) -> bool:
    """Refuse to start where results would be lost or mixed; otherwise return whether the run
    continues from the checkpoint in ``run_dir`` (true for ``resume=true``, and for ``resume=auto``
    where there is one) rather than starting afresh.

    ``resume=auto`` never deletes or mixes results either: a directory with results but no checkpoint
    is refused as without it, and the run loop refuses a checkpoint of another configuration."""
    word = AUTO if resume == AUTO else "true"
    if resume and overwrite:
        raise ConfigError(
            f"resume={word} and overwrite=true contradict each other: resume={word} continues the run in "
            f"{run_dir}, overwrite=true deletes its results. Choose one."
        )
    if resume == AUTO:
        if contents.has_checkpoint:
            log.info("resume=auto: %s holds %s; continuing that run", run_dir, contents.describe())
            return True
        if contents.has_results:
            raise ResultsExistError(_results_without_checkpoint_auto(run_dir, contents))
        return False
    if resume:
        if not contents.has_checkpoint:
            raise ResumeError(_nothing_to_resume(run_dir, contents))
        return True
    if contents.has_results and not overwrite:
        raise ResultsExistError(_results_exist(run_dir, contents))
    return False


def _results_without_checkpoint_auto(run_dir: Path, contents: RunDirContents) -> str:
    return (
        f"resume=auto cannot continue in {run_dir}: it holds {contents.describe()} but no {CHECKPOINT_FILE}, so "
        "that run cannot be resumed, and a new run never writes over results. Replace resume=auto by "
        "overwrite=true to delete them and start again, or choose another hydra.run.dir."
    )


def _nothing_to_resume(run_dir: Path, contents: RunDirContents) -> str:
    message = f"Nothing to resume in {run_dir}: no {CHECKPOINT_FILE}; run without resume=true."
    if contents.has_results:
        message += (
            f" It holds {contents.describe()} of a run whose checkpoint is gone, so that run cannot be continued: "
            "add overwrite=true (instead of resume=true) to delete them and start again, or choose another "
            "hydra.run.dir."
        )
    return message


def _results_exist(run_dir: Path, contents: RunDirContents) -> str:
    if contents.has_checkpoint:
        return (
            f"{run_dir} already holds results: {contents.describe()}. A new run never writes over them. "
            "Add resume=true to continue that run, or overwrite=true to delete them and start again, "
            "or choose another hydra.run.dir."
        )
    return (
        f"{run_dir} already holds results: {contents.describe()}, but no {CHECKPOINT_FILE}, so that run cannot be "
        "resumed. A new run never writes over them. Add overwrite=true to delete them and start again, "
        "or choose another hydra.run.dir."
    )


def clear_results(run_dir: Path) -> list[str]:
    """Delete pilot's own files from ``run_dir`` (``overwrite=true``); returns the names deleted.
    Files that pilot does not write (the user's notes, Hydra's ``.hydra/`` and log) stay."""
    removed = []
    for name in OWN_FILES:
        path = run_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    for name in OWN_DIRS:
        path = run_dir / name
        if path.is_symlink():
            path.unlink()
            removed.append(name + "/")
        elif path.is_dir():
            shutil.rmtree(path)
            removed.append(name + "/")
    return removed


# ------------------------------------------------------------------------------- interrupts


@dataclass
class RunProgress:
    """What an interruption message needs: where the run is, and how it was started."""

    run_dir: Path
    overrides: list[str] | None  # the command-line overrides; None outside Hydra
    num_sessions: int | None = None
    current: int | None = None  # the session being trained or evaluated
    saved: int = 0  # sessions in the checkpoint on disk

    def interrupted(self, signal_name: str) -> str:
        """One line: which sessions are safe, and the exact command that continues (or restarts)."""
        where = self._where()
        if self.saved == 0:
            return (
                f"Interrupted ({signal_name}) {where}: no session had finished, nothing to resume in {self.run_dir}. "
                f"Start again with: {self.command(resume=False)}"
            )
        done = "session 0 is" if self.saved == 1 else f"sessions 0-{self.saved - 1} are"
        return (
            f"Interrupted ({signal_name}) {where}: {done} saved in {self.run_dir}. "
            f"Resume with: {self.command(resume=True)}"
        )

    def _where(self) -> str:
        if self.current is None:
            return "after the last session" if self.saved == self.num_sessions else f"before session {self.saved}"
        total = f" ({self.current + 1}/{self.num_sessions})" if self.num_sessions else ""
        return f"during session {self.current}{total}"

    def command(self, resume: bool) -> str:
        """``python -m pilot.train <the original overrides> hydra.run.dir=<dir> [resume=true]``."""
        if self.overrides is None:
            words = ["<the same overrides>"]
        elif resume:
            words = [shlex.quote(o) for o in self.overrides if _override_key(o) not in START_KEYS]
        else:
            words = [shlex.quote(o) for o in self.overrides if _override_key(o) != "hydra.run.dir"]
        words.append(shlex.quote(f"hydra.run.dir={self.run_dir}"))
        if resume:
            words.append("resume=true")
        return " ".join(["python -m pilot.train", *words])


def _override_key(override: str) -> str:
    """``++a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def task_overrides() -> list[str] | None:
    """The command-line overrides of the current Hydra job, or None when not run through Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001 - a config without the overrides node: the message uses a placeholder
        return None


class _Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that ``except Exception`` blocks let it pass."""


@contextmanager
def interrupts_as_errors(progress: RunProgress) -> Iterator[None]:
    """Inside: SIGINT (KeyboardInterrupt) and SIGTERM become :class:`RunInterruptedError` with exit
    status 128 + signal number. The SIGTERM handler is installed only here and only from the main
    thread; the previous one is restored on the way out."""
    previous = _install_sigterm_handler()
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterruptedError(progress.interrupted("SIGINT"), 128 + signal.SIGINT) from None
    except _Terminated:
        raise RunInterruptedError(progress.interrupted("SIGTERM"), 128 + signal.SIGTERM) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _install_sigterm_handler() -> Any:
    """Install :func:`_on_sigterm`; returns the handler to restore, or None when none was installed
    (not the main thread, or SIGTERM does not have its default action). A handler that the host
    process installed is left alone: a submitit job (``hydra/launcher=slurm``) ignores the SIGTERM of
    a preemption and checkpoints and requeues on the signal that follows it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise _Terminated
