"""A run's log stays readable when nobody watches a terminal (SLURM, ``> log 2>&1``): no progress
bars, at most one line from W&B, and the one line per session from the run loop (``pilot.loop``).

The bar decision is checked on fake streams; a real ``python -m pilot.train`` in a subprocess (its
stdout and stderr are pipes, as in a batch job) checks the whole log, with progress bars switched on
and W&B offline.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import FAST

from pilot.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class ClosedStream(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def bar_output(monkeypatch, stream: io.StringIO, progress: bool = True) -> tuple[bool, str]:
    monkeypatch.setattr(sys, "stderr", stream)
    bar = Runtime(torch.device("cpu"), progress=progress).progress_bar(range(3), desc="eval s0")
    disabled = bar.disable  # read before the loop: closing a bar sets it
    assert list(bar) == [0, 1, 2]
    return disabled, stream.getvalue()


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    disabled, text = bar_output(monkeypatch, io.StringIO())
    assert disabled and text == ""


def test_progress_bar_on_a_terminal(monkeypatch):
    disabled, text = bar_output(monkeypatch, Terminal())
    assert not disabled and "eval s0" in text and "%|" in text


def test_progress_false_turns_bars_off_on_a_terminal_too(monkeypatch):
    disabled, text = bar_output(monkeypatch, Terminal(), progress=False)
    assert disabled and text == ""


def test_a_stream_that_cannot_say_counts_as_no_terminal(monkeypatch):
    disabled, text = bar_output(monkeypatch, ClosedStream())
    assert disabled and text == ""


def test_wandb_is_initialised_silent_and_logs_one_line(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    from pilot.sinks.wandb import WandbSink

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(
            config=types.SimpleNamespace(update=lambda *a, **k: None),
            settings=types.SimpleNamespace(sync_dir=str(tmp_path / "wandb" / "offline-run-x")),
            url=None,
            log=lambda *a, **k: None,
        )

    monkeypatch.setattr(wandb, "init", fake_init)
    info = {"method": "simplecil", "dataset": "synthetic", "scenario": "B0Inc5", "seed": 1, "group_id": "g"}
    with caplog.at_level("INFO", logger="pilot.sinks.wandb"):
        WandbSink(mode="offline").open(tmp_path, info, {}, [])
    settings = calls[0]["settings"]
    assert settings.silent is True and settings.console == "off"
    assert [r.getMessage() for r in caplog.records] == [
        f"W&B run saved offline; upload with: wandb sync {tmp_path / 'wandb' / 'offline-run-x'}"
    ]


@pytest.fixture(scope="module")
def batch_log(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m pilot.train`` as a batch job would run it: bars on, W&B offline, output to pipes."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("batch")
    overrides = [o for o in FAST if not o.startswith(("runtime.progress=", "logger="))]
    overrides += ["runtime.progress=true", "logger=wandb", "logger.wandb.mode=offline", "+method=simplecil"]
    overrides += ["scenario=b0inc5", f"paths.results_dir={root}", f"hydra.run.dir={root / 'run'}"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # quiet because of pilot's settings, not because of the environment
    done = subprocess.run(
        [sys.executable, "-m", "pilot.train", *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, root / "run"


def test_a_batch_log_has_no_progress_bars(batch_log):
    done, _ = batch_log
    log = done.stdout + done.stderr
    assert "%|" not in log and "\r" not in log
    sessions = [line for line in log.splitlines() if "pilot.loop" in line and "| classes" in line]
    assert len(sessions) == 2 and "session 0 (1/2)" in sessions[0] and "session 1 (2/2)" in sessions[1]


def test_a_batch_log_has_at_most_one_wandb_line(batch_log):
    done, run_dir = batch_log
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("wandb:")]  # no banner, no run summary
    wandb_lines = [line for line in lines if "W&B" in line or "wandb sync" in line]
    assert len(wandb_lines) == 1 and "W&B run saved offline; upload with: wandb sync" in wandb_lines[0]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run is still written
