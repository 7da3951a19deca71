"""More than one run at a time: ``resume=auto``, the SLURM presets (submitit's requeue, exercised with
its local executor) and the packing launcher ``python -m pilot.launch.pack``.

The end-to-end tests start real ``python -m pilot.train`` processes and compare what they write with
the same runs made in this process: a requeued job must end with the ``sessions.csv`` of an
uninterrupted run, and a packed sweep with the A_last of its runs made one after the other."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, run_config
from omegaconf import OmegaConf

from pilot.errors import ConfigError, ResultsExistError, ResumeError
from pilot.launch import pack
from pilot.launch.slurm import ResumeAuto
from pilot.loop import RunInterrupted
from pilot.rundir import RunDirContents, RunProgress, check_start, interrupts_as_errors, read_resume

ROOT = Path(__file__).resolve().parent.parent
THREE_SESSIONS = FAST + ["+method=simplecil", "scenario.init_cls=4", "scenario.increment=3"]
TIMING = ["train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "peak_mem_mb", "finished_at"]
METRICS = ["run_id", "method", "seed", "session", "n_seen", "acc", "acc_old", "acc_new", "acc_avg", "forgetting", "bwt"]


def metrics(run_dir: Path) -> pd.DataFrame:
    """The rows of ``sessions.csv`` without the timings (which differ between two runs)."""
    return pd.read_csv(run_dir / "sessions.csv").drop(columns=TIMING)


def subprocess_env(*paths: Path) -> dict[str, str]:
    """This environment, with ``paths`` and the repository first on PYTHONPATH (for child processes)."""
    extra = [str(p) for p in paths] + [str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(extra + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture(scope="module")
def reference_three(tmp_path_factory) -> Path:
    """An uninterrupted three-session run (seed 1993), the reference of the interrupted ones."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_config(THREE_SESSIONS, run_dir)
    return run_dir


# ------------------------------------------------------------------------------ resume=auto


def contents(sessions: int = 0, checkpoint: bool = False) -> RunDirContents:
    return RunDirContents(session_rows=sessions, matrix_rows=2 * sessions, has_checkpoint=checkpoint)


def test_resume_auto_continues_only_where_there_is_a_checkpoint(tmp_path):
    assert check_start(tmp_path, contents(), "auto", overwrite=False) is False  # empty: start afresh
    assert check_start(tmp_path, contents(2, checkpoint=True), "auto", overwrite=False) is True
    assert check_start(tmp_path, contents(2, checkpoint=True), True, overwrite=False) is True
    assert check_start(tmp_path, contents(), False, overwrite=False) is False
    assert check_start(tmp_path, contents(2, checkpoint=True), False, overwrite=True) is False
    with pytest.raises(ResultsExistError) as err:  # results whose checkpoint is gone: never written over
        check_start(tmp_path, contents(2), "auto", overwrite=False)
    assert str(err.value) == (
        f"resume=auto cannot continue in {tmp_path}: it holds sessions.csv (2 sessions), matrix.csv (4 rows) but "
        "no checkpoint.pt, so that run cannot be resumed, and a new run never writes over results. Replace "
        "resume=auto by overwrite=true to delete them and start again, or choose another hydra.run.dir."
    )
    with pytest.raises(ConfigError, match="^resume=auto and overwrite=true contradict each other: resume=auto "):
        check_start(tmp_path, contents(), "auto", overwrite=True)
    with pytest.raises(ResumeError, match="Nothing to resume"):  # resume=true is as strict as before
        check_start(tmp_path, contents(), True, overwrite=False)


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("auto", "auto")])
def test_read_resume(value, expected):
    assert read_resume(OmegaConf.create({"resume": value})) == expected
    assert read_resume(OmegaConf.create({})) is False


@pytest.mark.parametrize("value", ["yes", "Auto", 1, "maybe"])
def test_read_resume_refuses_other_values(value):
    with pytest.raises(ConfigError) as err:
        read_resume(OmegaConf.create({"resume": value}))
    assert str(err.value) == (
        f"resume={value} is not a boolean: write resume=true or resume=false, or resume=auto "
        "(continue if the run directory holds a checkpoint, else start afresh)."
    )


def test_resume_auto_in_an_empty_dir_is_a_fresh_run(tmp_path, reference_three):
    run_dir = tmp_path / "run"
    run_config(THREE_SESSIONS + ["resume=auto"], run_dir)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))


def test_resume_auto_continues_an_interrupted_run_identically(tmp_path, reference_three):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="stopped after session 0"):
        run_config(THREE_SESSIONS + ["resume=auto", "debug.stop_after_session=0"], run_dir)
    assert len(pd.read_csv(run_dir / "sessions.csv")) == 1
    table = run_config(THREE_SESSIONS + ["resume=auto"], run_dir)
    assert table["session"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))
    matrix = (run_dir / "matrix.csv").read_bytes()
    run_config(THREE_SESSIONS + ["resume=auto"], run_dir)  # a finished run: nothing left to do, nothing changes
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference_three))
    assert (run_dir / "matrix.csv").read_bytes() == matrix


def test_resume_auto_refuses_the_checkpoint_of_another_configuration(tmp_path, reference_three):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_config(THREE_SESSIONS + ["debug.stop_after_session=0"], run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("sessions.csv", "matrix.csv", "checkpoint.pt")}
    with pytest.raises(ResumeError, match="belongs to another configuration"):
        run_config(THREE_SESSIONS + ["resume=auto", "seed=7"], run_dir)
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_sigterm_handler_of_the_host_process_is_left_alone():
    """submitit ignores the SIGTERM of a preemption and requeues on the USR2 that follows: inside such a
    job pilot must not turn SIGTERM into an interruption (a plain process still gets pilot's handler)."""

    def host_handler(signum, frame) -> None:  # noqa: ARG001 - the signature signal.signal wants
        pass

    previous = signal.signal(signal.SIGTERM, host_handler)
    try:
        with interrupts_as_errors(RunProgress(Path("/r"), None)):
            assert signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    with interrupts_as_errors(RunProgress(Path("/r"), None)):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, host_handler)
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------------------- SLURM presets


def compose_hydra(overrides: list[str]):
    """The ``hydra`` node that ``python -m pilot.train`` composes with ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pilot.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True).hydra


needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install pilot-cil[slurm])",
)


@needs_submitit
def test_slurm_presets_compose_with_requeue_and_resume_auto():
    slurm = compose_hydra(["+method=simplecil", "hydra/launcher=slurm"])
    assert slurm.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.launcher.gpus_per_node, slurm.launcher.tasks_per_node, slurm.launcher.max_num_timeout) == (1, 1, 3)
    assert slurm.launcher.partition is None and slurm.launcher.signal_delay_s == 120
    assert slurm.callbacks.resume_auto._target_ == "pilot.launch.slurm.ResumeAuto"
    assert slurm.callbacks.check_results_dir._target_ == "pilot.config.CheckResultsDir"  # train.yaml's, kept
    local = compose_hydra(["+method=simplecil", "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=5"])
    assert local.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert local.launcher.timeout_min == 5 and local.launcher.gpus_per_node == 0
    assert local.callbacks.resume_auto._target_ == "pilot.launch.slurm.ResumeAuto"


@pytest.mark.parametrize(
    "params, expected",
    [(None, {"resume": "auto"}), ({"seed": "1,2"}, {"seed": "1,2", "resume": "auto"}), ({"resume": "false"}, None)],
)
def test_resume_auto_callback_adds_resume_auto_to_the_sweep(params, expected):
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": "BasicSweeper", "params": params}}})
    OmegaConf.set_readonly(config.hydra, True)  # as Hydra hands it over
    ResumeAuto().on_multirun_start(config)
    assert OmegaConf.to_container(config.hydra.sweeper.params) == (expected or params)


PREEMPT_PROBE = '''
    """A results sink for tests/test_launchers.py: once, after it has written session `session` of
    the run with seed `seed`, it sends its own process submitit's preemption signal (USR2), as SLURM
    does to a job it preempts. The marker file makes it fire on the first attempt only."""

    import os
    import signal
    from pathlib import Path

    from pilot.sinks.base import Sink


    class PreemptOnce(Sink):
        def __init__(self, marker: str, seed: int, session: int) -> None:
            self.marker, self.seed, self.session = Path(marker), seed, session

        def open(self, run_dir, provenance, config, previous) -> None:
            self.active = provenance["seed"] == self.seed

        def write(self, record, matrix_rows) -> None:
            if self.active and record["session"] == self.session and not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))

        def close(self, summary) -> None:
            pass
'''


@needs_submitit
def test_a_preempted_slurm_job_is_requeued_and_continues_its_run_dir(tmp_path, reference_three):
    """A one-run sweep with the local twin of the SLURM preset; the run (seed 1993) is preempted
    (USR2) after writing session 1, so its checkpoint holds session 0 only. submitit calls the launcher's
    checkpoint(), requeues the same job, and the job continues in the same run directory with
    resume=auto. Its sessions.csv must equal that of an uninterrupted run."""
    (tmp_path / "preempt_probe.py").write_text(textwrap.dedent(PREEMPT_PROBE))
    marker, results = tmp_path / "preempted", tmp_path / "results"
    probe = ["+logger.preempt._target_=preempt_probe.PreemptOnce", f"+logger.preempt.marker={marker}"]
    probe += ["+logger.preempt.seed=1993", "+logger.preempt.session=1"]
    command = [sys.executable, "-m", "pilot.train", "-m", "hydra/launcher=slurm_local", *THREE_SESSIONS, *probe]
    command += ["seed=1993", f"paths.results_dir={results}", "runtime.cpu_threads=1"]
    done = subprocess.run(command, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    (sweep_dir,) = (results / "multirun").iterdir()  # one sweep, the requeued job in its own run dir again
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".") and p.is_dir()) == [
        "0_simplecil_synthetic_s1993"
    ]
    preempted = sweep_dir / "0_simplecil_synthetic_s1993"
    assert marker.exists()  # the preemption signal was sent
    logs = "\n".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs  # submitit's checkpoint-and-requeue path
    assert "Resuming " in (preempted / "train.log").read_text()  # the second attempt continued the first
    assert "sessions 0-0 of 3 are done" in (preempted / "train.log").read_text()
    assert "- resume=auto" in (preempted / ".hydra" / "overrides.yaml").read_text()
    pd.testing.assert_frame_equal(metrics(preempted)[METRICS], metrics(reference_three)[METRICS])


# ------------------------------------------------------------------------------- pack launcher


@pytest.mark.parametrize(
    "overrides",
    [
        ["+method=l2p,ease", "seed=1,2,3", "dataset=cifar100"],
        ["a=1,2", "b=x", "a=3,4,5", "~c", "++d.e=range(0,3)"],
        ["x='a,b'", "y=choice(p,q)", "z=[1,2]", "w={k: v}"],
        [],
    ],
)
def test_expand_sweep_gives_the_runs_of_hydras_basic_sweeper(overrides):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (expected,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    assert pack.expand_sweep(overrides) == expected


def test_expand_sweep_order():
    assert pack.expand_sweep(["+method=l2p,ease", "seed=1,2"]) == [
        ["+method=l2p", "seed=1"],
        ["+method=l2p", "seed=2"],
        ["+method=ease", "seed=1"],
        ["+method=ease", "seed=2"],
    ]
    with pytest.raises(pack.PackError, match="cannot read the overrides"):
        pack.expand_sweep(["a=[1,"])


def test_devices_and_slots(monkeypatch):
    assert [(s.device, s.visible) for s in pack.parse_devices("0,1", 2)] == [("0", "0"), ("1", "1")] * 2
    assert [(s.device, s.visible) for s in pack.parse_devices("cpu:2", 1)] == [("cpu0", ""), ("cpu1", "")]
    assert [s.device for s in pack.parse_devices("cpu", 3)] == ["cpu0"] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [s.visible for s in pack.parse_devices(None, 1)] == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(pack.PackError, match="no GPU found"):
        pack.parse_devices(None, 1)
    for spec, per_device in (("cpu:0", 1), ("0,0", 1), ("0,,1", 1), ("0", 0)):
        with pytest.raises(pack.PackError):
            pack.parse_devices(spec, per_device)


FAKE_RUN = """
import json, os, sys, time
start = time.time()
time.sleep(0.6)
name = os.environ["FAKE_RUN_OUT"] + "/" + str(time.time_ns()) + ".json"
json.dump({"visible": os.environ["CUDA_VISIBLE_DEVICES"], "argv": sys.argv[1:], "start": start, "end": time.time()},
          open(name, "w"))
sys.exit(3 if "seed=3" in sys.argv else 0)
"""


def test_runs_are_pinned_to_their_gpu_k_at_a_time(tmp_path, monkeypatch):
    """Six stand-in runs on two "GPUs", two at a time on each: every run sees one GPU, no GPU ever
    has more than two runs at once, a failing run is reported and the others still run."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("FAKE_RUN_OUT", str(out))
    runs = [pack.Run(i, job) for i, job in enumerate(pack.expand_sweep(["+method=a,b", "seed=1,2,3"]))]
    report = io.StringIO()
    pack.run_all(runs, pack.parse_devices("0,1", 2), tmp_path / "sweep", [sys.executable, "-c", FAKE_RUN], 0.05, report)
    seen = [json.loads(p.read_text()) for p in out.iterdir()]
    assert len(seen) == 6 and {s["visible"] for s in seen} == {"0", "1"}
    for record in seen:
        assert "runtime.device=cpu" not in record["argv"] and "resume=auto" in record["argv"]
        run_dir = record["argv"][-1]
        assert run_dir.startswith(f"hydra.run.dir='{tmp_path}/sweep/") and run_dir.endswith(pack.RUN_DIR_NAME + "'")
    for gpu in ("0", "1"):
        spans = [(s["start"], s["end"]) for s in seen if s["visible"] == gpu]
        most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert 1 <= most <= 2
    assert [run.returncode for run in runs] == [0, 0, 3, 0, 0, 3]
    assert [run.slot.visible for run in runs if run.slot] and all(run.slot for run in runs)
    assert report.getvalue().count("FAILED") == 2
    assert f"run 2 FAILED on {runs[2].slot.device} (exit status 3): " in report.getvalue()
    assert (tmp_path / "sweep" / "logs" / "2.log").read_text().startswith(f"# device {runs[2].slot.device} ")


def test_a_packed_sweep_equals_its_runs_made_one_by_one(tmp_path, capsys):
    """Three runs on one CPU "device", two at a time; the second has a bad value and fails without
    stopping the others. Each finished run's sessions.csv names its method and seed, and its A_last
    equals that of the same run made here, alone."""
    sweep_dir = tmp_path / "sweep"
    overrides = [*FAST, "+method=simplecil", "scenario=b0inc5", "seed=1,oops,2"]
    status = pack.main(["--devices", "cpu:1", "--per-device", "2", "--sweep-dir", str(sweep_dir), "--", *overrides])
    printed = capsys.readouterr().out
    assert status == 1  # one run failed

    with open(sweep_dir / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert [row["rc"] for row in summary] == ["0", "2", "0"]
    assert {row["device"] for row in summary} == {"cpu0"}
    assert "run 1 FAILED on cpu0 (exit status 2): ConfigError: seed=oops is not allowed" in printed
    assert f"log: {sweep_dir / 'logs' / '1.log'}" in printed
    assert "ConfigError: seed=oops is not allowed" in (sweep_dir / "logs" / "1.log").read_text()
    assert "2 of 3 run(s) succeeded" in printed

    for row, seed in zip([summary[0], *summary[2:]], (1, 2)):
        run_dir = Path(row["run_dir"])
        assert run_dir == sweep_dir / f"{row['run']}_simplecil_synthetic_s{seed}"
        sessions = pd.read_csv(run_dir / "sessions.csv")
        assert sessions["method"].unique().tolist() == ["simplecil"] and sessions["seed"].unique().tolist() == [seed]
        alone = run_config([*FAST, "+method=simplecil", "scenario=b0inc5", f"seed={seed}"], tmp_path / f"alone{seed}")
        assert float(row["acc_last"]) == pytest.approx(round(float(alone["acc"].iloc[-1]), 2), abs=1e-9)
        assert sessions["acc"].iloc[-1] == pytest.approx(alone["acc"].iloc[-1], abs=1e-4)
        assert f"{row['acc_last']}  " in printed  # in the printed table too
