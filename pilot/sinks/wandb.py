"""Weights & Biases: the resolved config, training curves, per-session metrics and the results files.

``mode``: ``offline`` (default; files under the run directory, upload later with ``wandb sync``),
``online`` or ``disabled``. Any W&B failure is logged and switches this sink off; the CSV results
are written independently and are never lost to it. ``import wandb`` happens only when enabled.

What a run holds:

* config: the resolved config, plus the run's identity (:func:`pilot.provenance.make_provenance`: run_id,
  group_id, labels, ...) under ``pilot``; group = ``group_id`` (the seeds of one setting), tags =
  method, dataset, scenario and backbone (and ``logger.wandb.tags``);
* per epoch of the shared epoch loop (:meth:`log_epoch`, fed by ``runtime.on_epoch``):
  ``train/loss``, ``train/lr``, ``train/session``, ``train/session_epoch`` against ``train/epoch``
  (epochs counted over the run, from 0);
* per session: the scalars of ``sessions.csv`` against ``session`` (from 0, as in the CSV), the
  accuracy matrix so far as a table (``accuracy_matrix``) and as a heat-map image
  (``accuracy_matrix_heatmap``, the figure of ``pilot.tables``);
* at the end: the final metrics in the summary, and ``sessions.csv``, ``matrix.csv`` and
  ``config.yaml`` as an artifact of type ``results`` (``results-<run_id>``).

W&B is kept quiet (``wandb_settings``): no banner, no run summary, no console capture; this sink logs
one line per run instead, saying where the run is (the offline directory and its ``wandb sync``
command, or the online URL). A log of a sweep then has the run's own lines, not W&B's.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pilot.errors import ConfigError
from pilot.sinks.base import Sink

if TYPE_CHECKING:
    from wandb import Run  # imported lazily at run time (wandb is slow to import)

Mode = Literal["offline", "online", "disabled"]

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_id.txt"
RESULT_FILES = ("sessions.csv", "matrix.csv", "config.yaml")
TAG_KEYS = ("method", "dataset", "scenario", "backbone")
EPOCH_STEP = "train/epoch"
EPOCH_METRICS = ("train/loss", "train/lr", "train/session", "train/session_epoch")
SESSION_STEP = "session"
MATRIX_KEY, HEATMAP_KEY = "accuracy_matrix", "accuracy_matrix_heatmap"
HEATMAP_DPI = 150  # a screen image, not print


def wandb_settings() -> dict[str, Any]:
    """Settings for ``wandb.init``: ``silent`` (no banner, hints or run summary on the console) and
    ``console="off"`` (stdout/stderr are not captured into the run: the log file already holds them)."""
    return {"silent": True, "console": "off"}


def run_tags(provenance: dict[str, Any], extra: list[str]) -> list[str]:
    """``extra`` (``logger.wandb.tags``), then the run's method, dataset, scenario and backbone; each
    once, in that order, at most 64 characters (W&B's limit)."""
    tags = [*extra, *(str(provenance[k]) for k in TAG_KEYS if provenance.get(k) not in (None, ""))]
    return [t[:64] for t in dict.fromkeys(tags)]


class WandbSink(Sink):
    """Logs a run to W&B (see the module docstring for what and where); never fatal."""

    def __init__(
        self, mode: str = "offline", project: str = "pilot", entity: str | None = None, tags: list[str] | None = None
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r}: use offline, online or disabled")
        self.mode = cast(Mode, mode)  # checked above
        self.project, self.entity, self.tags = project, entity, list(tags or [])
        self.run: Run | None = None
        self.run_dir: Path | None = None
        self.provenance: dict[str, Any] = {}
        self.matrix_rows: list[dict[str, Any]] = []
        self.epochs_logged = 0
        self.session_metrics: set[str] = set()
        self.media = True

    def open(self, run_dir, provenance, config, previous) -> None:
        if self.mode == "disabled":
            return
        self._guard("open", self._open, Path(run_dir), provenance, config, previous)

    def _open(self, run_dir: Path, provenance: dict[str, Any], config: dict[str, Any], previous) -> None:
        import wandb

        self.run_dir, self.provenance = run_dir, dict(provenance)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        name = f"{provenance['method']}-{provenance['dataset']}-{provenance['scenario']}-s{provenance['seed']}"
        self.run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            dir=str(run_dir),
            id=run_id,
            name=name,
            group=provenance["group_id"],
            tags=run_tags(provenance, self.tags),
            config=config,
            resume="allow",
            job_type="train",
            settings=wandb.Settings(**wandb_settings()),
        )
        run = self.run
        run.config.update({"pilot": provenance}, allow_val_change=True)
        if self.mode == "offline":
            log.info("W&B run saved offline; upload with: wandb sync %s", run.settings.sync_dir)
        else:
            log.info("W&B run: %s", run.url)
        self._define_metric(EPOCH_STEP)
        for key in EPOCH_METRICS:
            self._define_metric(key, EPOCH_STEP)
        self._define_metric(SESSION_STEP)
        for key in (MATRIX_KEY, HEATMAP_KEY):
            self._define_metric(key, SESSION_STEP)
        # An offline resume starts a new local file: repeat the finished sessions. An online run that
        # W&B resumed already holds them.
        replay = not getattr(self.run, "resumed", False)
        for i, (record, matrix_rows) in enumerate(previous):
            self.matrix_rows += matrix_rows
            if replay:
                self._log(record, media=i == len(previous) - 1)

    @property
    def _open_run(self) -> Run:
        if self.run is None:
            raise RuntimeError("the W&B run is not open")
        return self.run

    def _define_metric(self, key: str, step: str | None = None) -> None:
        """Chart ``key`` against ``step`` (``None``: ``key`` is itself an x axis). Only the charts'
        x axis depends on it, so a failure is noted in the debug log and the values are still logged."""
        try:
            self._open_run.define_metric(key, step_metric=step)
        except Exception as err:  # noqa: BLE001
            log.debug("W&B define_metric(%r) failed (%s: %s)", key, type(err).__name__, err)

    def log_epoch(self, session: int, epoch: int, loss: float, lr: float) -> None:
        if self.run is not None:
            self._guard("log", self._log_epoch, session, epoch, loss, lr)

    def _log_epoch(self, session: int, epoch: int, loss: float, lr: float) -> None:
        row: dict[str, float] = {EPOCH_STEP: self.epochs_logged, "train/session": session, "train/session_epoch": epoch}
        row.update({k: v for k, v in (("train/loss", loss), ("train/lr", lr)) if math.isfinite(v)})
        self._open_run.log(row)
        self.epochs_logged += 1

    def write(self, record, matrix_rows) -> None:
        if self.run is not None:
            self.matrix_rows += matrix_rows
            self._guard("log", self._log, record)

    def close(self, summary) -> None:
        if self.run is None:
            return
        self._guard("finish", self._finish, summary)

    def _log(self, record: dict[str, Any], media: bool = True) -> None:
        """One session's row: its scalars against ``session``; with ``media``, the matrix so far as a
        table and a heat map (a resume replays the finished sessions with the matrix on the last only)."""
        scalars = _scalars(record)
        for key in scalars.keys() - self.session_metrics - {SESSION_STEP}:
            self._define_metric(key, SESSION_STEP)
            self.session_metrics.add(key)
        self._open_run.log({**scalars, **(self._matrix_media() if media else {})})

    def _matrix_media(self) -> dict[str, Any]:
        """The accuracy matrix so far as a W&B table (a row per session k, a column per block j;
        empty above the diagonal) and as the heat map of ``pilot.tables``. Drawing is optional: if it
        fails, the scalars are still logged and media stay off for the run."""
        if not self.media or not self.matrix_rows:
            return {}
        try:
            import wandb
            from matplotlib import rc_context
            from PIL import Image

            from pilot.tables.plots import STYLE, heatmap_figure, heatmap_title, matrix_from_rows

            R = matrix_from_rows(self.matrix_rows)
            columns: list[str | int] = ["session", *(f"block {j}" for j in range(len(R)))]
            data = [[k] + [None if math.isnan(v) else float(v) for v in R[k]] for k in range(len(R))]
            with rc_context(STYLE):
                figure = heatmap_figure(R, heatmap_title(self.provenance), dpi=HEATMAP_DPI)
                png = io.BytesIO()
                figure.savefig(png, format="png", dpi=HEATMAP_DPI)
            png.seek(0)
            with Image.open(png) as image:
                heatmap = wandb.Image(image.convert("RGB"), caption=f"accuracy matrix after session {len(R) - 1}")
            return {MATRIX_KEY: wandb.Table(columns=columns, data=data), HEATMAP_KEY: heatmap}
        except Exception as err:  # noqa: BLE001 - the scalars matter more than the pictures
            log.warning(
                "W&B accuracy-matrix table/heat map failed (%s: %s); logging scalars only", type(err).__name__, err
            )
            self.media = False
            return {}

    def _finish(self, summary: dict[str, Any]) -> None:
        try:
            self._log_results_artifact()
        finally:
            self._open_run.summary.update(_scalars(summary))
            self._open_run.finish()
            self.run = None

    def _log_results_artifact(self) -> None:
        """``sessions.csv``, ``matrix.csv`` and ``config.yaml`` as one artifact (copied now, so a later
        resume that rewrites them does not change what this run uploads)."""
        import wandb

        run_dir = self.run_dir
        files = [run_dir / name for name in RESULT_FILES if (run_dir / name).is_file()] if run_dir else []
        if not files:
            return
        artifact = wandb.Artifact(
            f"results-{self.provenance.get('run_id', self._open_run.id)}",
            type="results",
            description="pilot's result files of this run: sessions.csv, matrix.csv, config.yaml",
            metadata={k: v for k, v in self.provenance.items() if isinstance(v, (str, int, float, bool))},
        )
        for path in files:
            artifact.add_file(str(path), name=path.name)
        self._open_run.log_artifact(artifact)

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
