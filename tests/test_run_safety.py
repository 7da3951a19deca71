"""A run directory is never written by two runs at once, results are never overwritten or mixed,
a damaged checkpoint is named, and an interrupted run stops cleanly with the command that resumes it.

Every refusal is checked three ways: the exception (or exit status), a phrase of its message, and
the bytes of the earlier results, which must not change."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, compose_config, run_config

from pilot.checkpoint import CHECKPOINT_KEYS
from pilot.errors import (
    CheckpointError,
    ConfigError,
    PilotError,
    ResultsExistError,
    ResumeError,
    RunDirBusyError,
    RunInterruptedError,
)
from pilot.learners.base import Learner
from pilot.loop import RunInterrupted
from pilot.rundir import HOLDER_FILE, LOCK_FILE, RunDirLock, RunProgress, interrupts_as_errors

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ("sessions.csv", "matrix.csv", "checkpoint.pt")
TWO_SESSIONS = FAST + ["+method=simplecil", "scenario=b0inc5"]
THREE_SESSIONS = FAST + ["+method=simplecil", "scenario.init_cls=4", "scenario.increment=3"]
TIMING = ["train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "peak_mem_mb", "finished_at"]


def snapshot(run_dir: Path) -> dict[str, bytes | None]:
    """The bytes of the result files (None for a missing one)."""
    return {name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None for name in RESULTS}


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "sessions.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-session run; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_config(TWO_SESSIONS, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reference_three(tmp_path_factory) -> Path:
    """An uninterrupted three-session run, the reference for the interrupted ones."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_config(THREE_SESSIONS, run_dir)
    return run_dir


@pytest.fixture
def done(finished_run, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ------------------------------------------------------------------------------------- lock


def test_second_run_into_a_locked_dir_is_refused_before_anything_is_built(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunDirLock(run_dir):
        with pytest.raises(RunDirBusyError) as err:
            run_config(TWO_SESSIONS, run_dir)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert f"{run_dir} is in use by another pilot run (pid {os.getpid()} on " in message
    assert "Wait for it to finish or choose another hydra.run.dir" in message
    assert not (run_dir / "sessions.csv").exists() and not (run_dir / "config.yaml").exists()


def test_locked_dir_with_results_is_left_byte_identical(done):
    before = snapshot(done)
    with RunDirLock(done):
        with pytest.raises(RunDirBusyError, match="in use by another pilot run"):
            run_config(TWO_SESSIONS + ["resume=true"], done)
        with pytest.raises(RunDirBusyError, match="in use by another pilot run"):
            run_config(TWO_SESSIONS + ["overwrite=true"], done)
    assert snapshot(done) == before


def test_a_lock_held_by_another_process_blocks_and_its_stale_file_does_not(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pilot.rundir import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(300)",
            str(run_dir),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=f"in use by another pilot run \\(pid {holder.pid} on "):
            run_config(TWO_SESSIONS, run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The killed process left its files behind; the kernel has dropped its lock.
    assert (run_dir / LOCK_FILE).exists() and (run_dir / HOLDER_FILE).exists()
    table = run_config(TWO_SESSIONS, run_dir)
    assert len(table) == 2 and len(pd.read_csv(run_dir / "sessions.csv")) == 2


def test_lock_is_released_after_a_finished_run(done):
    # `done` was written by a run that returned normally: its lock is free and its holder file gone.
    with RunDirLock(done) as lock:
        assert lock.is_locked
    assert not (done / HOLDER_FILE).exists()


def test_lock_is_released_after_a_failed_run(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="init_cls=20 exceeds the 10 classes"):
        run_config(TWO_SESSIONS + ["scenario.init_cls=20"], run_dir)
    table = run_config(TWO_SESSIONS, run_dir)  # right after the failure, same directory
    assert table["session"].tolist() == [0, 1]


# --------------------------------------------------------------------------- never overwrite


def test_results_with_a_checkpoint_need_resume_or_overwrite(done):
    before = snapshot(done)
    with pytest.raises(ResultsExistError) as err:
        run_config(TWO_SESSIONS, done)
    assert isinstance(err.value, ConfigError) and err.value.exit_code == 2
    message = str(err.value)
    assert f"{done} already holds results: sessions.csv (2 sessions), matrix.csv (3 rows), checkpoint.pt" in message
    assert "resume=true" in message and "overwrite=true" in message
    assert snapshot(done) == before


def test_results_whose_checkpoint_was_deleted_are_not_overwritten(done):
    (done / "checkpoint.pt").unlink()
    before = snapshot(done)
    with pytest.raises(ResultsExistError) as err:
        run_config(TWO_SESSIONS, done)
    message = str(err.value)
    assert "sessions.csv (2 sessions), matrix.csv (3 rows), but no checkpoint.pt" in message
    assert "cannot be resumed" in message and "overwrite=true" in message and "resume=true" not in message
    assert snapshot(done) == before


def test_a_lone_matrix_csv_counts_as_results(done):
    (done / "checkpoint.pt").unlink()
    (done / "sessions.csv").unlink()
    before = snapshot(done)
    with pytest.raises(ResultsExistError, match=r"already holds results: matrix.csv \(3 rows\), but no checkpoint"):
        run_config(TWO_SESSIONS, done)
    assert snapshot(done) == before


def test_hydra_files_and_header_only_csvs_are_not_results(done):
    # What Hydra writes before the run, and what a run interrupted in session 0 leaves.
    (done / "checkpoint.pt").unlink()
    for name in ("sessions.csv", "matrix.csv"):
        header = (done / name).read_text().splitlines()[0]
        (done / name).write_text(header + "\n")
    (done / ".hydra").mkdir(exist_ok=True)
    (done / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (done / "train.log").write_text("[hydra] starting\n")
    table = run_config(TWO_SESSIONS, done)
    assert pd.read_csv(done / "sessions.csv")["session"].tolist() == table["session"].tolist() == [0, 1]


def test_overwrite_replaces_the_results_with_a_fresh_runs(done, finished_run):
    (done / "notes.txt").write_text("mine")
    (done / "wandb").mkdir()
    (done / "wandb" / "offline-run-x").write_text("old")
    (done / "wandb_id.txt").write_text("oldid")
    old = snapshot(done)
    run_config(TWO_SESSIONS + ["seed=7"], done.parent / "fresh7")
    run_config(TWO_SESSIONS + ["seed=7", "overwrite=true"], done)
    new = snapshot(done)
    assert all(new[name] != old[name] for name in RESULTS)
    pd.testing.assert_frame_equal(metrics(done), metrics(done.parent / "fresh7"))
    assert new["matrix.csv"] == (done.parent / "fresh7" / "matrix.csv").read_bytes()
    assert (done / "notes.txt").read_text() == "mine"  # not pilot's: kept
    assert not (done / "wandb").exists() and not (done / "wandb_id.txt").exists()


def test_overwrite_keeps_the_old_results_when_the_new_run_cannot_start(done):
    before = snapshot(done)
    with pytest.raises(ConfigError, match="init_cls=20 exceeds the 10 classes"):
        run_config(TWO_SESSIONS + ["scenario.init_cls=20", "overwrite=true"], done)
    assert snapshot(done) == before


def test_overwrite_does_not_change_the_run_id(tmp_path):
    from pilot.provenance import config_hash

    a = compose_config(TWO_SESSIONS, tmp_path)
    b = compose_config(TWO_SESSIONS + ["overwrite=true"], tmp_path)
    assert a.overwrite is False and b.overwrite is True
    assert config_hash(a) == config_hash(b)


# ----------------------------------------------------------------------------------- resume


def test_resume_in_an_empty_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ResumeError) as err:
        run_config(TWO_SESSIONS + ["resume=true"], run_dir)
    assert err.value.exit_code == 2
    assert f"Nothing to resume in {run_dir}: no checkpoint.pt; run without resume=true." in str(err.value)
    assert not (run_dir / "sessions.csv").exists()


def test_resume_with_results_but_no_checkpoint_is_refused(done):
    (done / "checkpoint.pt").unlink()
    before = snapshot(done)
    with pytest.raises(ResumeError) as err:
        run_config(TWO_SESSIONS + ["resume=true"], done)
    message = str(err.value)
    assert "Nothing to resume" in message and "no checkpoint.pt" in message
    assert "sessions.csv (2 sessions)" in message and "overwrite=true" in message
    assert snapshot(done) == before


def test_resume_and_overwrite_together_are_refused(done):
    before = snapshot(done)
    with pytest.raises(ConfigError, match="resume=true and overwrite=true contradict each other"):
        run_config(TWO_SESSIONS + ["resume=true", "overwrite=true"], done)
    assert snapshot(done) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("resume=no", "resume=no is not a boolean: write resume=true or resume=false"),
        ("resume=maybe", "resume=maybe is not a boolean"),
        ("resume=1", "resume=1 is not a boolean"),
        ("overwrite=1x", "overwrite=1x is not a boolean: write overwrite=true or overwrite=false"),
        ("overwrite=yes", "overwrite=yes is not a boolean"),
    ],
)
def test_non_boolean_switches_are_refused(done, override, message):
    before = snapshot(done)
    with pytest.raises(ConfigError, match=message) as err:
        run_config(TWO_SESSIONS + [override], done)
    assert err.value.exit_code == 2
    assert snapshot(done) == before


def test_resume_of_a_finished_run_changes_no_metric(done, finished_run):
    run_config(TWO_SESSIONS + ["resume=true"], done)
    pd.testing.assert_frame_equal(metrics(done), metrics(finished_run))
    assert (done / "matrix.csv").read_bytes() == (finished_run / "matrix.csv").read_bytes()


# ------------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_is_named(done):
    data = (done / "checkpoint.pt").read_bytes()
    (done / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = snapshot(done)
    with pytest.raises(CheckpointError) as err:
        run_config(TWO_SESSIONS + ["resume=true"], done)
    assert isinstance(err.value, ResumeError) and err.value.exit_code == 2
    message = str(err.value)
    assert f"{done / 'checkpoint.pt'} cannot be used: the file is truncated or damaged" in message
    assert "overwrite=true" in message
    assert snapshot(done) == before


def test_garbage_checkpoint_is_named(done):
    (done / "checkpoint.pt").write_bytes(b"\x00not a checkpoint\xff" * 64)
    before = snapshot(done)
    with pytest.raises(CheckpointError, match="checkpoint.pt cannot be used: the file is truncated or damaged"):
        run_config(TWO_SESSIONS + ["resume=true"], done)
    assert snapshot(done) == before


def test_a_readable_file_that_is_not_a_checkpoint_is_named(done):
    torch.save({"weights": torch.zeros(2)}, done / "checkpoint.pt")
    before = snapshot(done)
    with pytest.raises(CheckpointError, match="it is not a pilot checkpoint \\(no run_id, sessions_done"):
        run_config(TWO_SESSIONS + ["resume=true"], done)
    assert snapshot(done) == before


def test_checkpoint_loads_with_weights_only(finished_run):
    """A checkpoint holds tensors and plain data only: plain ``torch.load(weights_only=True)`` reads it."""
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert set(CHECKPOINT_KEYS) <= set(state) and state["sessions_done"] == 2
    assert isinstance(state["evaluator"]["R"], torch.Tensor) and isinstance(state["history"][0][0]["acc"], float)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch planted",))


def test_a_checkpoint_that_would_run_code_is_refused(done, monkeypatch):
    monkeypatch.chdir(done)
    state = torch.load(done / "checkpoint.pt", weights_only=True)
    torch.save({**state, "extra": _RunsCode()}, done / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="it holds objects that a pilot checkpoint does not \\(posix.system"):
        run_config(TWO_SESSIONS + ["resume=true"], done)
    assert not (done / "planted").exists()


def _as_before_weights_only(path: Path) -> None:
    """Rewrite the checkpoint at ``path`` the way pilot wrote them before they loaded with weights_only:
    numpy arrays for the numpy RNG and the evaluator, numpy scalars in the history."""
    state = torch.load(path, weights_only=True)
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
    for key in ("R", "n", "top5"):
        state["evaluator"][key] = state["evaluator"][key].numpy()
    state["history"] = [
        ({k: np.float64(v) if isinstance(v, float) else v for k, v in record.items()}, rows)
        for record, rows in state["history"]
    ]
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_checkpoint_written_before_weights_only_still_resumes(tmp_path, reference_three):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="stopped after session 0"):
        run_config(THREE_SESSIONS + ["debug.stop_after_session=0"], run_dir)
    _as_before_weights_only(run_dir / "checkpoint.pt")
    run_config(THREE_SESSIONS + ["resume=true"], run_dir)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))
    assert (run_dir / "matrix.csv").read_bytes() == (reference_three / "matrix.csv").read_bytes()


def test_checkpoint_of_another_configuration_is_refused(done):
    before = snapshot(done)
    with pytest.raises(ResumeError, match="belongs to another configuration") as err:
        run_config(TWO_SESSIONS + ["seed=7", "resume=true"], done)
    assert err.value.exit_code == 2
    assert snapshot(done) == before


# ------------------------------------------------------------------------ interrupts, in-process


def interrupt_in_session(monkeypatch, run_dir: Path, session: int, interrupt) -> dict[str, bytes | None]:
    """Make ``Learner.fit`` call ``interrupt()`` when it reaches ``session``; the returned dict
    receives the result files' bytes as they were at that moment."""
    seen: dict[str, bytes | None] = {}
    fit = Learner.fit

    def fit_or_stop(self, data):
        if data.info.index == session:
            seen.update(snapshot(run_dir))
            interrupt()
        fit(self, data)

    monkeypatch.setattr(Learner, "fit", fit_or_stop)
    return seen


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def _send_sigterm_to_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises before this returns


@pytest.mark.parametrize(
    "interrupt, code, name",
    [(_raise_keyboard_interrupt, 130, "SIGINT"), (_send_sigterm_to_self, 143, "SIGTERM")],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupt_names_the_saved_sessions_and_the_resume_command(tmp_path, monkeypatch, interrupt, code, name):
    run_dir = tmp_path / "run"
    seen = interrupt_in_session(monkeypatch, run_dir, 1, interrupt)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterruptedError) as err:
        run_config(THREE_SESSIONS, run_dir)
    assert err.value.exit_code == code and err.value.__cause__ is None
    message = str(err.value)
    assert "\n" not in message
    assert f"Interrupted ({name}) during session 1 (2/3): session 0 is saved in {run_dir}. Resume with: " in message
    assert message.endswith(
        f"python -m pilot.train {' '.join(THREE_SESSIONS)} "
        f"paths.results_dir={tmp_path} hydra.run.dir={run_dir} resume=true"
    )
    assert seen == snapshot(run_dir)  # as they were when it stopped
    assert signal.getsignal(signal.SIGTERM) == sigterm_before  # handler restored
    with RunDirLock(run_dir):  # and the lock released
        pass


def test_interrupt_before_any_session_finished_says_start_again(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    seen = interrupt_in_session(monkeypatch, run_dir, 0, _raise_keyboard_interrupt)
    with pytest.raises(RunInterruptedError) as err:
        run_config(TWO_SESSIONS, run_dir)
    message = str(err.value)
    assert err.value.exit_code == 130 and seen == snapshot(run_dir)
    assert "Interrupted (SIGINT) during session 0 (1/2): no session had finished" in message
    assert "Start again with: python -m pilot.train" in message and "resume=true" not in message
    monkeypatch.undo()
    assert run_config(TWO_SESSIONS, run_dir)["session"].tolist() == [0, 1]  # the same command works


def test_debug_stop_still_works_and_resumes(tmp_path, reference_three):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="stopped after session 0"):
        run_config(THREE_SESSIONS + ["debug.stop_after_session=0"], run_dir)
    run_config(THREE_SESSIONS + ["resume=true"], run_dir)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))


def test_resume_command_replaces_the_start_switches_and_quotes():
    progress = RunProgress(
        Path("/r/my run"),
        ["+method=l2p", "resume=false", "overwrite=true", "scenario.class_order=[1, 2]"],
        num_sessions=3,
        current=2,
        saved=2,
    )
    assert progress.interrupted("SIGTERM") == (
        "Interrupted (SIGTERM) during session 2 (3/3): sessions 0-1 are saved in /r/my run. "
        "Resume with: python -m pilot.train +method=l2p 'scenario.class_order=[1, 2]' "
        "'hydra.run.dir=/r/my run' resume=true"
    )
    outside_hydra = RunProgress(Path("/r"), None, num_sessions=3, current=None, saved=3)
    assert outside_hydra.interrupted("SIGINT") == (
        "Interrupted (SIGINT) after the last session: sessions 0-2 are saved in /r. "
        "Resume with: python -m pilot.train <the same overrides> hydra.run.dir=/r resume=true"
    )


def test_sigterm_handler_is_only_installed_in_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    inside: list = []

    def worker() -> None:
        with interrupts_as_errors(RunProgress(Path("/r"), None)):
            inside.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert inside == [before]
    with interrupts_as_errors(RunProgress(Path("/r"), None)):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_codes():
    assert PilotError.exit_code == 2 and ResultsExistError.exit_code == 2 and RunDirBusyError.exit_code == 2
    assert RunInterruptedError("x").exit_code == 130 and RunInterruptedError("x", 143).exit_code == 143


# ----------------------------------------------------------------------- interrupts, the CLI

# The interrupted run sleeps in session 1, so that the signal is sure to arrive during it.
SLOW_SESSION_1 = """
import runpy, sys, time
from pilot.learners.base import Learner
fit = Learner.fit
def slow_fit(self, data):
    if data.info.index >= 1:
        time.sleep(300)
    fit(self, data)
Learner.fit = slow_fit
runpy.run_module("pilot.train", run_name="__main__", alter_sys=True)
"""
CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def start_slow_run(run_dir: Path, cwd: Path) -> subprocess.Popen:
    args = [*THREE_SESSIONS, f"paths.results_dir={cwd}", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_SESSION_1, *args],
        cwd=cwd,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_session_0(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 120) -> None:
    """Until sessions.csv has one row and its checkpoint is on disk (so session 1 has begun)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        csv = run_dir / "sessions.csv"
        if (run_dir / "checkpoint.pt").exists() and csv.exists() and len(csv.read_text().splitlines()) == 2:
            return
        time.sleep(0.1)
    raise AssertionError("session 0 did not finish in time")


def interrupt_cli_run(proc: subprocess.Popen, run_dir: Path, sig: signal.Signals) -> str:
    """Send ``sig`` once session 0 is saved; check the exit status, that stderr holds no traceback
    and exactly one interruption line, and that the saved files are untouched. Returns that line."""
    try:
        wait_for_session_0(proc, run_dir)
        saved = snapshot(run_dir)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    lines = [line for line in (stdout + stderr).splitlines() if "Interrupted (" in line]
    assert len(lines) == 1, stdout + stderr
    assert lines[0].startswith(
        f"RunInterruptedError: Interrupted ({sig.name}) during session 1 (2/3): session 0 is saved in {run_dir}. "
        "Resume with: python -m pilot.train "
    )
    assert lines[0].endswith(f"hydra.run.dir={run_dir} resume=true")
    assert snapshot(run_dir) == saved
    with RunDirLock(run_dir):  # the lock was released
        pass
    return lines[0]


def test_cli_interrupts_exit_cleanly_and_the_printed_command_resumes(tmp_path, reference_three):
    # Both runs start at once: the start of `python -m pilot.train` (torch, timm) dominates this test.
    runs = {sig: (tmp_path / sig.name, start_slow_run(tmp_path / sig.name, tmp_path)) for sig in SIGNALS}
    lines = {sig: interrupt_cli_run(proc, run_dir, sig) for sig, (run_dir, proc) in runs.items()}

    # Run the printed command as it is (once: it is the same for both signals).
    run_dir = runs[signal.SIGINT][0]
    words = shlex.split(lines[signal.SIGINT].split("Resume with: ", 1)[1])
    assert words[:3] == ["python", "-m", "pilot.train"]
    resumed = subprocess.run(
        [sys.executable, *words[1:]], cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "matrix.csv"), pd.read_csv(reference_three / "matrix.csv"))
