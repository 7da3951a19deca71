"""Tidy CSV results: ``sessions.csv`` (one row per run and session), ``matrix.csv`` (the accuracy
matrix in long form) and ``epochs.csv`` (each training epoch's mean loss and learning rate). Rows are
appended, flushed and fsynced as each session ends.

Columns added after the first release come last (``acc_val``, ``acc_val_avg``, the run's
``data_hash``, ``weights_hash``, ``eval_protocol``, then ``acc_nme``, ``acc_nme_avg``; ``matrix.csv``:
``acc_nme``), so older files are a prefix of today's layout; ``pilot.tables`` reads files with or
without them (a missing or empty value is unknown)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from pilot.provenance import RUN_EXTRA_KEYS
from pilot.sinks.base import Sink

RUN_COLUMNS = ["run_id", "group_id", "method", "dataset", "backbone", "scenario", "seed", "num_sessions"]
# Run-level values known once the data and the backbone are built; empty cells where unknown.
RUN_EXTRA_COLUMNS = list(RUN_EXTRA_KEYS)  # data_hash, weights_hash, eval_protocol (see pilot.provenance)
SESSION_COLUMNS = RUN_COLUMNS + [
    "session",
    "n_seen",
    "n_new",
    "acc",
    "acc_top5",
    "acc_old",
    "acc_new",
    "acc_avg",
    "forgetting",
    "bwt",
    "n_test",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "elapsed_s",
    "peak_mem_mb",
    "params_total",
    "params_trainable",
    "finished_at",
    "acc_val",  # top-1 on the held-out validation images of the seen classes (empty without scenario.val_fraction)
    "acc_val_avg",  # mean of acc_val over the sessions so far
    *RUN_EXTRA_COLUMNS,
    "acc_nme",  # nearest-mean-of-exemplars top-1 on the seen classes (empty for learners without a memory)
    "acc_nme_avg",  # mean of acc_nme over the sessions so far
]
MATRIX_COLUMNS = RUN_COLUMNS + ["session", "block", "acc", "n_test", *RUN_EXTRA_COLUMNS, "acc_nme"]
# One row per training epoch: ``epoch`` counts a session's epochs over all of its training loops
# (e.g. SLCA's fine-tuning, then its classifier alignment), from 0.
EPOCH_COLUMNS = ["run_id", "method", "session", "epoch", "loss", "lr"]
SESSIONS_FILE, MATRIX_FILE, EPOCHS_FILE = "sessions.csv", "matrix.csv", "epochs.csv"


class CsvSink(Sink):
    """Writes ``sessions.csv`` and ``matrix.csv`` into the run directory."""

    def __init__(self, float_format: str = "%.4f") -> None:
        self.float_format = float_format

    def open(self, run_dir, provenance, config, previous) -> None:
        self.provenance = {k: provenance[k] for k in RUN_COLUMNS}
        self.provenance |= {k: provenance.get(k) for k in RUN_EXTRA_COLUMNS}  # None: an empty cell
        self.files = {}
        for name, columns in ((SESSIONS_FILE, SESSION_COLUMNS), (MATRIX_FILE, MATRIX_COLUMNS)):
            handle = open(Path(run_dir) / name, "w", newline="")  # rewritten on resume: drops rows past the checkpoint
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            self.files[name] = (handle, writer)
        for record, matrix_rows in previous:
            self._append(record, matrix_rows)
        self._open_epochs(Path(run_dir), len(previous))
        self._flush()

    def _open_epochs(self, run_dir: Path, sessions_done: int) -> None:
        """``epochs.csv``, keeping the rows of the sessions a resumed run does not repeat."""
        path = run_dir / EPOCHS_FILE
        kept = []
        if sessions_done and path.exists():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["session"]) < sessions_done]
        handle = open(path, "w", newline="")
        writer = csv.DictWriter(handle, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        self.files[EPOCHS_FILE] = (handle, writer)
        self._epochs_in_session: dict[int, int] = {}

    def log_epoch(self, session: int, epoch: int, loss: float, lr: float) -> None:
        count = self._epochs_in_session.get(session, 0)
        self._epochs_in_session[session] = count + 1
        row = {"run_id": self.provenance["run_id"], "method": self.provenance["method"], "session": session}
        self.files[EPOCHS_FILE][1].writerow({**row, "epoch": count, "loss": f"{loss:.8g}", "lr": f"{lr:.6g}"})
        self.files[EPOCHS_FILE][0].flush()

    def write(self, record, matrix_rows) -> None:
        self._append(record, matrix_rows)
        self._flush()

    def close(self, summary) -> None:
        for handle, _ in self.files.values():
            handle.close()

    def _append(self, record: dict[str, Any], matrix_rows: list[dict[str, Any]]) -> None:
        self.files[SESSIONS_FILE][1].writerow(self._format({**self.provenance, **record}))
        for row in matrix_rows:
            self.files[MATRIX_FILE][1].writerow(self._format({**self.provenance, **row}))

    def _format(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in row.items():
            if isinstance(value, float):
                value = "" if value != value else self.float_format % value  # NaN -> empty cell
            out[key] = value
        return out

    def _flush(self) -> None:
        for handle, _ in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
