"""The run loop. It trains and evaluates session by session and never names a method.

    for each session:  learner.fit(session) -> evaluate on all seen classes -> sinks.write -> checkpoint

Everything is built from the config with ``hydra.utils.instantiate``; a finished session is on
disk (CSV rows and a checkpoint) before the next one starts, and ``resume=true`` in the same run
directory continues after the last finished session. The run directory is locked while a run
writes it and is never written over by accident (see :mod:`pilot.rundir`).

Every row also says what the numbers rest on: ``data_hash`` (the images and labels), ``weights_hash``
(the backbone's starting weights), both hashed once when they are built, and ``eval_protocol``
(whether the learner's test predictions depend on the batch, and whether test batches are
class-sorted or shuffled). With ``scenario.val_fraction`` the run also scores the held-out
validation images of the seen classes after each session (``acc_val``, ``acc_val_avg``), which is
what ``pilot.tables --select-by`` chooses hyperparameters with.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pilot import distributed
from pilot.backbones.factory import weights_hash
from pilot.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from pilot.config import build, ensure_writable_dir, validate_config
from pilot.data.images import ClassificationData
from pilot.data.pipeline import TEST, VAL, DataPipeline
from pilot.data.scenario import Scenario, SessionInfo
from pilot.errors import ConfigError, ResumeError
from pilot.eval.evaluator import Evaluator
from pilot.learners.base import Learner, build_learner
from pilot.modules.feature_store import FeatureSource
from pilot.provenance import config_hash, data_hash, eval_protocol, make_provenance
from pilot.rundir import (
    CHECKPOINT_FILE,
    RunDirLock,
    RunProgress,
    check_start,
    clear_results,
    inspect_run_dir,
    interrupts_as_errors,
    read_flag,
    read_resume,
    task_overrides,
)
from pilot.runtime import Runtime
from pilot.sinks.base import Sink, epoch_hook
from pilot.sinks.csv import CsvSink

log = logging.getLogger(__name__)
MEMORY_FILE = "memory.csv"  # exemplars of a learner with a memory, after the last finished session
RANDOM_INIT = "random-init"  # weights_hash of a backbone built without pretrained weights
SUMMARY_COLUMNS = ["session", "n_seen", "acc", "acc_old", "acc_new", "acc_avg", "forgetting", "wall_time_s"]


class RunInterrupted(RuntimeError):
    """Raised by ``debug.stop_after_session`` to simulate an interruption (tests of resume)."""


@dataclass
class RunData:
    """The cheap first half of a run: runtime, dataset and scenario (built before any weights load)."""

    runtime: Runtime
    data: ClassificationData
    scenario: Scenario


@dataclass
class RunModel:
    """The second half: the learner on its backbone, the input pipeline, the evaluator of the test
    images, that of the validation images (None without ``scenario.val_fraction``), and the hash of
    the backbone's weights as built (before any training)."""

    learner: Learner
    pipeline: DataPipeline
    evaluator: Evaluator
    val_evaluator: Evaluator | None = None
    weights_hash: str | None = None


def build_data(cfg: DictConfig) -> RunData:
    """Check the config, seed, build the runtime, the dataset (its paths are checked) and the split."""
    validate_config(cfg)
    runtime: Runtime = build(cfg.runtime)
    seed_everything(int(cfg.seed))
    data: ClassificationData = build(cfg.dataset)
    return RunData(runtime, data, build(cfg.scenario, num_classes=data.num_classes))


def build_model(cfg: DictConfig, parts: RunData) -> RunModel:
    """Load the backbone's weights and build the learner (which checks it can use that backbone)."""
    backbone = build(cfg.backbone)
    start = time.perf_counter()
    # Random weights (backbone.pretrained=false, tests) follow the run seed: a hash would tell the seeds
    # of one setting apart, so they are named instead.
    weights = weights_hash(backbone) if backbone.pretrained else RANDOM_INIT
    log.debug("weights_hash %s in %.2fs", weights, time.perf_counter() - start)
    learner = build_learner(cfg.method, backbone, parts.scenario, parts.runtime)
    learner.to(parts.runtime.device)
    if parts.runtime.channels_last:
        learner.to(memory_format=torch.channels_last)
    pipeline = DataPipeline(parts.data, parts.scenario, build(cfg.transforms), parts.runtime, seed=int(cfg.seed))
    device = parts.runtime.device
    val_evaluator = Evaluator(parts.scenario, device, split=VAL) if pipeline.has_validation else None
    return RunModel(learner, pipeline, Evaluator(parts.scenario, device), val_evaluator, weights)


def run(cfg: DictConfig, run_dir: str | Path) -> pd.DataFrame:
    """Execute one run described by ``cfg`` in ``run_dir``; returns the per-session records.

    The directory is locked for the whole run, and checked before anything is built: earlier
    results are only continued (``resume=true``) or deleted first (``overwrite=true``). Ctrl-C and
    SIGTERM end the run with a :class:`RunInterruptedError` that says how to resume it."""
    resume_mode, overwrite = read_resume(cfg), read_flag(cfg, "overwrite")
    run_dir = ensure_writable_dir(Path(run_dir))
    progress = RunProgress(run_dir, task_overrides())
    # Data-parallel runs: rank 0 locks and checks the directory and writes everything; the others wait
    # for its check, then compute alongside it (pilot.distributed).
    main = distributed.is_main()
    with interrupts_as_errors(progress), RunDirLock(run_dir) if main else contextlib.nullcontext():
        resume = check_start(run_dir, inspect_run_dir(run_dir), resume_mode, overwrite) if main else False
        resume = bool(distributed.broadcast_object(resume))  # rank 0's decision, once it has checked
        return _run_locked(cfg, run_dir, resume, overwrite, progress)


def _run_locked(cfg: DictConfig, run_dir: Path, resume: bool, overwrite: bool, progress: RunProgress) -> pd.DataFrame:
    """The run itself, in a locked directory that :func:`check_start` has accepted."""
    checkpoint = _checkpoint_to_resume(cfg, run_dir) if resume else None
    progress.saved = checkpoint["sessions_done"] if checkpoint is not None else 0
    parts = build_data(cfg)
    runtime, scenario = parts.runtime, parts.scenario
    provenance = make_provenance(cfg, scenario.name, scenario.num_sessions)
    start = time.perf_counter()
    provenance["data_hash"] = data_hash(parts.data)
    log.debug("data_hash %s in %.2fs", provenance["data_hash"], time.perf_counter() - start)
    progress.num_sessions = scenario.num_sessions
    model = build_model(cfg, parts)
    learner, evaluator = model.learner, model.evaluator
    provenance["weights_hash"] = model.weights_hash
    decoder = "device" if model.pipeline.file_decoder is not None else "pil"
    runtime.feature_source = FeatureSource.for_run(
        cfg, runtime, provenance["data_hash"], model.weights_hash, model.pipeline.transforms, decoder
    )
    provenance["eval_protocol"] = eval_protocol(learner.eval_protocol, scenario.shuffle_test)
    if checkpoint is not None:
        _check_same_inputs(checkpoint, provenance, run_dir)
    main = distributed.is_main()
    distributed.same_on_every_rank({"run_id": provenance["run_id"], "data_hash": provenance["data_hash"]})
    if overwrite and main:
        _clear_previous_results(run_dir)
    if main:
        _save_run_description(run_dir, cfg, parts.data, scenario, provenance)

    history: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if checkpoint is not None:
        history = _restore(model, checkpoint, runtime)
        log.info(
            "Resuming %s: sessions 0-%d of %d are done", run_dir, checkpoint["sessions_done"] - 1, scenario.num_sessions
        )

    sinks = _open_sinks(cfg, run_dir, provenance, history) if main else []
    try:
        _log_start(provenance, scenario, learner, runtime, len(history))
        for info in scenario.sessions[len(history) :]:
            progress.current = info.index
            runtime.on_epoch = epoch_hook(sinks, info.index)  # per-epoch loss and lr to the sinks
            record, matrix_rows = _run_session(model, info, runtime, history)
            runtime.flush_feature_stores()  # features computed this session, for later runs (and hits/misses)
            history.append((record, matrix_rows))
            for sink in sinks:
                sink.write(record, matrix_rows)
            if main:
                _write_memory(run_dir, learner)
                save_checkpoint(
                    run_dir,
                    {
                        "run_id": provenance["run_id"],
                        "sessions_done": info.index + 1,
                        "learner": learner.state_dict(),
                        "evaluator": evaluator.state_dict(),
                        "val_evaluator": model.val_evaluator.state_dict() if model.val_evaluator else None,
                        "history": history,
                        "rng": rng_state(),
                        "data_hash": provenance["data_hash"],
                        "weights_hash": provenance["weights_hash"],
                    },
                )
            progress.saved = info.index + 1
            log.info(_session_line(record, scenario.num_sessions))
            stop = cfg.debug.stop_after_session
            if stop is not None and info.index == stop and info.index + 1 < scenario.num_sessions:
                raise RunInterrupted(f"debug.stop_after_session={stop}: stopped after session {stop}")
        progress.current = None
    finally:
        runtime.on_epoch = None
        runtime.flush_feature_stores()  # an interrupted session's features too
        summary = _final_summary(history)
        for sink in sinks:
            sink.close(summary)
    table = pd.DataFrame([record for record, _ in history])
    log.info("Per-session results (%s):\n%s", run_dir / "sessions.csv", _format_table(table))
    log.info("Final: " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    return table


def _run_session(
    model: RunModel, info: SessionInfo, runtime: Runtime, history: list
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    learner, pipeline, evaluator = model.learner, model.pipeline, model.evaluator
    runtime.reset_peak_memory()
    start = time.perf_counter()
    learner.train()
    learner.fit(pipeline.session(info))
    _synchronize(runtime)
    trained = time.perf_counter()
    learner.eval()
    evaluate(learner, pipeline, evaluator, info)
    acc_val = math.nan
    if model.val_evaluator is not None:
        acc_val = float(evaluate(learner, pipeline, model.val_evaluator, info, split=VAL)["acc"])
    _synchronize(runtime)
    done = time.perf_counter()
    previous_elapsed = history[-1][0]["elapsed_s"] if history else 0.0
    record = evaluator.record(info.index)
    earlier_val = [r.get("acc_val", math.nan) for r, _ in history]
    record.update(
        {
            "acc_val": acc_val,
            "acc_val_avg": float(np.mean(earlier_val + [acc_val])) if acc_val == acc_val else math.nan,
            "n_seen": info.total,
            "n_new": info.num_new,
            "train_time_s": trained - start,
            "eval_time_s": done - trained,
            "wall_time_s": done - start,
            "elapsed_s": previous_elapsed + done - start,
            "peak_mem_mb": runtime.peak_memory_mb(),
            "params_total": learner.num_parameters(),
            "params_trainable": learner.trainable_parameters,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return record, evaluator.matrix_rows(info.index)


@torch.inference_mode()
def evaluate(
    learner: Learner, pipeline: DataPipeline, evaluator: Evaluator, info: SessionInfo, split: str = TEST
) -> dict[str, Any]:
    """Top-1/top-5 of ``learner`` on the ``split`` images (test, or the held-out validation images)
    of every class seen after session ``info``, in batches of ``eval_batch_size``: class-sorted as the
    reference evaluates, or in a seeded random order with ``scenario.shuffle_test``. A learner with
    ``predict_nme`` (an exemplar memory) is also scored by its nearest-mean-of-exemplars logits."""
    evaluator.start_session(info.index)
    batches = pipeline.eval_batches(split, range(0, info.total), learner.eval_batch_size, unit=learner.eval_unit)
    desc = f"eval s{info.index}" if split == TEST else f"{split} s{info.index}"
    predict_nme = getattr(learner, "predict_nme", None)
    for batch in learner.runtime.progress_bar(batches, desc=desc):
        if len(batch) == 0:  # a data-parallel rank's empty part of a small last batch
            continue
        logits = learner.predict(batch)
        nme = predict_nme(batch) if predict_nme is not None else None  # exemplar-memory learners
        for name, scores in (("predict", logits), ("predict_nme", nme)):
            if scores is not None and scores.shape != (len(batch), info.total):
                raise RuntimeError(
                    f"{type(learner).__name__}.{name} returned shape {tuple(scores.shape)}, "
                    f"expected ({len(batch)}, {info.total})"
                )
        evaluator.update(logits.float(), batch.labels, nme.float() if nme is not None else None)
    return evaluator.end_session()


def _checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The checkpoint that ``resume=true`` continues (:func:`check_start` has seen that it exists),
    refused if it is unreadable or was written by another configuration."""
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:  # deleted since the check
        raise ResumeError(f"Nothing to resume in {run_dir}: no {CHECKPOINT_FILE}; run without resume=true.")
    run_id = config_hash(cfg)
    if checkpoint["run_id"] != run_id:
        raise ResumeError(
            f"The checkpoint in {run_dir} belongs to another configuration (run_id "
            f"{checkpoint['run_id']}, now {run_id}). Resume with the same overrides "
            f"as the original run; {run_dir / 'config.yaml'} holds them."
        )
    return checkpoint


def _check_same_inputs(checkpoint: dict[str, Any], provenance: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume on other data or other starting weights than the checkpoint was made with
    (same config, but the dataset files or the pretrained weights changed in between). Checkpoints
    written before the hashes existed, and hashes that are unknown, are not compared."""
    for key, what in (("data_hash", "dataset"), ("weights_hash", "backbone weights")):
        before, now = checkpoint.get(key), provenance.get(key)
        if before and now and before != now:
            raise ResumeError(
                f"The checkpoint in {run_dir} was made with other {what} ({key} {before}, now {now}): the run "
                "would continue on different inputs. Restore the original files, or start afresh with "
                "overwrite=true."
            )


def _restore(model: RunModel, checkpoint: dict[str, Any], runtime: Runtime) -> list:
    """Put the learner, the evaluators and the RNGs back as they were; returns the finished sessions."""
    model.learner.restore(checkpoint["learner"], checkpoint["sessions_done"])
    model.learner.to(runtime.device)
    model.evaluator.load_state_dict(checkpoint["evaluator"])
    if model.val_evaluator is not None and checkpoint.get("val_evaluator") is not None:
        model.val_evaluator.load_state_dict(checkpoint["val_evaluator"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["history"]


def _write_memory(run_dir: Path, learner: Learner) -> None:
    """``memory.csv``: the exemplars a learner with a memory keeps after the session (``class``,
    ``sample_id`` in the training split, ``rank`` in selection order), written atomically."""
    memory = getattr(learner, "memory", None)
    if memory is None or not hasattr(memory, "to_rows"):
        return
    path = run_dir / MEMORY_FILE
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "sample_id", "rank"])
        writer.writeheader()
        writer.writerows(memory.to_rows())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _clear_previous_results(run_dir: Path) -> None:
    """``overwrite=true``: delete the earlier run's files, once the new run has been built."""
    removed = clear_results(run_dir)
    if removed:
        log.warning("overwrite=true: deleted %s from %s", ", ".join(removed), run_dir)


def _save_run_description(
    run_dir: Path, cfg: DictConfig, data: ClassificationData, scenario: Scenario, provenance: dict[str, Any]
) -> None:
    """The resolved config, the class order and the session split, beside the results."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    order = [{"label": i, "original_class": c, "name": data.class_names[c]} for i, c in enumerate(scenario.class_order)]
    (run_dir / "class_order.json").write_text(json.dumps(order, indent=1))
    sessions = [
        {
            "session": s.index,
            "labels": [s.known, s.total],
            "size": s.num_new,
            "original_classes": list(scenario.class_order[s.known : s.total]),
        }
        for s in scenario.sessions
    ]
    (run_dir / "sessions.json").write_text(json.dumps({**provenance, "sessions": sessions}, indent=1))


def _open_sinks(cfg: DictConfig, run_dir: Path, provenance: dict[str, Any], history: list) -> list[Sink]:
    sinks = [build(node) for node in (cfg.logger or {}).values()]
    if not any(isinstance(s, CsvSink) for s in sinks):
        raise ConfigError("logger must include the csv sink (results, resume and tables read it); e.g. logger=csv")
    config = OmegaConf.to_container(cfg, resolve=True)
    for sink in sinks:
        sink.open(run_dir, provenance, config, history)
    return sinks


def _final_summary(history: list) -> dict[str, float]:
    if not history:
        return {}
    last = history[-1][0]
    summary = {
        "acc_last": last["acc"],
        "acc_avg": last["acc_avg"],
        "forgetting": last["forgetting"],
        "bwt": last["bwt"],
        "sessions": float(last["session"] + 1),
        "elapsed_s": last["elapsed_s"],
    }
    if last.get("acc_val", math.nan) == last.get("acc_val"):  # a validation set was held out
        summary.update(acc_val_last=last["acc_val"], acc_val_avg=last["acc_val_avg"])
    if last.get("acc_nme", math.nan) == last.get("acc_nme"):  # nearest-mean-of-exemplars scores
        summary.update(acc_nme_last=last["acc_nme"], acc_nme_avg=last["acc_nme_avg"])
    return summary


def _session_line(record: dict[str, Any], num_sessions: int) -> str:
    def fmt(v: float) -> str:
        return "  -  " if v != v else f"{v:5.2f}"

    return (
        f"session {record['session']} ({record['session'] + 1}/{num_sessions}) | classes {record['n_seen']:4d} | "
        f"acc {fmt(record['acc'])} | "
        f"old {fmt(record['acc_old'])} | new {fmt(record['acc_new'])} | avg {fmt(record['acc_avg'])} | "
        f"forgetting {fmt(record['forgetting'])} | "
        + (f"val {fmt(record['acc_val'])} | " if record.get("acc_val", math.nan) == record.get("acc_val") else "")
        + (f"nme {fmt(record['acc_nme'])} | " if record.get("acc_nme", math.nan) == record.get("acc_nme") else "")
        + f"{record['wall_time_s']:.1f}s"
    )


def _format_table(table: pd.DataFrame) -> str:
    return table[SUMMARY_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")


def _log_start(provenance: dict[str, Any], scenario: Scenario, learner: Learner, runtime: Runtime, done: int) -> None:
    log.info(
        "%s | %s | %s | %s (%d sessions: %s) | seed %d | %s %s | run_id %s",
        provenance["method"],
        provenance["dataset"],
        provenance["backbone"],
        scenario.name,
        scenario.num_sessions,
        list(scenario.sizes),
        provenance["seed"],
        runtime.device,
        runtime.precision if runtime.is_cuda else "fp32",
        provenance["run_id"],
    )
    log.info(
        "data_hash %s | weights_hash %s | eval %s",
        provenance["data_hash"] or "unknown",
        provenance["weights_hash"] or "unknown",
        provenance["eval_protocol"],
    )
    if done:
        log.info("%d session(s) already finished; continuing with session %d", done, done)


def _synchronize(runtime: Runtime) -> None:
    if runtime.is_cuda:
        torch.cuda.synchronize(runtime.device)
