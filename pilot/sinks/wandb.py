"""Weights & Biases: the resolved config, per-session scalars and the final metrics.

``mode``: ``offline`` (default; files under the run directory, upload later with ``wandb sync``),
``online`` or ``disabled``. Any W&B failure is logged and switches this sink off; the CSV results
are written independently and are never lost to it. ``import wandb`` happens only when enabled.

W&B is kept quiet (``wandb_settings``): no banner, no run summary, no console capture; this sink logs
one line per run instead, saying where the run is (the offline directory and its ``wandb sync``
command, or the online URL). A log of a sweep then has the run's own lines, not W&B's.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

from pilot.errors import ConfigError
from pilot.sinks.base import Sink

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_id.txt"


def wandb_settings() -> dict[str, Any]:
    """Settings for ``wandb.init``: ``silent`` (no banner, hints or run summary on the console) and
    ``console="off"`` (stdout/stderr are not captured into the run: the log file already holds them)."""
    return {"silent": True, "console": "off"}


class WandbSink(Sink):
    def __init__(
        self, mode: str = "offline", project: str = "pilot", entity: str | None = None, tags: list[str] | None = None
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r}: use offline, online or disabled")
        self.mode, self.project, self.entity, self.tags = mode, project, entity, list(tags or [])
        self.run = None

    def open(self, run_dir, run_info, config, previous) -> None:
        if self.mode == "disabled":
            return
        self._guard("open", self._open, Path(run_dir), run_info, config, previous)

    def _open(self, run_dir: Path, run_info: dict[str, Any], config: dict[str, Any], previous) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        name = f"{run_info['method']}-{run_info['dataset']}-{run_info['scenario']}-s{run_info['seed']}"
        self.run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            dir=str(run_dir),
            id=run_id,
            name=name,
            group=run_info["group_id"],
            tags=self.tags,
            config=config,
            resume="allow",
            job_type="train",
            settings=wandb.Settings(**wandb_settings()),
        )
        self.run.config.update({"pilot": run_info}, allow_val_change=True)
        if self.mode == "offline":
            log.info("W&B run saved offline; upload with: wandb sync %s", self.run.settings.sync_dir)
        else:
            log.info("W&B run: %s", self.run.url)
        for record, _ in previous:  # offline resume starts a new local file: repeat the finished sessions
            self._log(record)

    def write(self, record, matrix_rows) -> None:
        if self.run is not None:
            self._guard("log", self._log, record)

    def close(self, summary) -> None:
        if self.run is None:
            return
        self._guard("finish", self._finish, summary)

    def _log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["session"]))

    def _finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(_scalars(summary))
        self.run.finish()
        self.run = None

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - W&B must never break the run or the CSV
            log.warning(
                "W&B %s failed (%s: %s); W&B logging is off for the rest of this run, CSV results are unaffected",
                what,
                type(err).__name__,
                err,
            )
            self.run = None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """Numeric, finite entries only (W&B charts cannot show NaN)."""
    return {
        k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
