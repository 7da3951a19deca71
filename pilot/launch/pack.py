"""Pack a sweep onto the GPUs of one machine: ``K`` runs at a time on each GPU.

    python -m pilot.launch.pack --per-device 2 [--devices 0,1] -- +method=l2p,ease seed=1,2,3 dataset=cifar100

The overrides after ``--`` are expanded as ``python -m pilot.train -m`` would (Hydra's own override
parser; ``a=1,2 b=x,y`` gives the four runs of the cartesian product, in Hydra's order). Each run is a
``python -m pilot.train`` process of its own with ``CUDA_VISIBLE_DEVICES`` set to its one GPU, in its
own run directory ``<sweep dir>/<num>_<method>_<dataset>_s<seed>`` (Hydra's multirun layout), with its
console output in ``<sweep dir>/logs/<num>.log``. ``--devices cpu:N`` runs on the CPU instead
(``N`` CPU "devices", ``runtime.device=cpu``), for machines without a GPU and for tests.

* A run that fails is reported (exit status, last line, log path) when it ends; the others go on.
* At the end a table (run, device, exit status, seconds, A_last from the run's ``sessions.csv``) is
  printed and written to ``<sweep dir>/summary.csv``; the exit status is 1 if any run failed.
* Every run gets ``resume=auto`` unless the overrides set ``resume`` or ``overwrite``: the same
  command with ``--sweep-dir <that dir>`` continues the runs an interruption stopped, starts the ones
  that failed before their first session again, and leaves finished runs as they are.

Separate processes rather than a Hydra launcher plugin: ``CUDA_VISIBLE_DEVICES`` must be set before
CUDA starts in a process, a crash (or CUDA out-of-memory) of one run cannot take the others with it,
and the module needs no ``hydra_plugins`` package. It imports neither torch nor pilot's run loop.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import IO, Sequence

RUN_DIR_NAME = "${labels.method}_${labels.dataset}_s${seed}"  # after "<num>_", as hydra.sweep.subdir
SUMMARY_FILE = "summary.csv"
LOGS_DIR = "logs"
# Overrides that the launcher sets itself, or that have no meaning for single runs.
RESERVED_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode")
START_KEYS = ("resume", "overwrite")


class PackError(Exception):
    """A command line the launcher cannot carry out (reported as one line, exit status 2)."""


# ------------------------------------------------------------------------------------- sweep


def override_key(override: str) -> str:
    """``++a.b=1`` -> ``a.b``; ``hydra/launcher=x`` -> ``hydra/launcher``."""
    return override.split("=", 1)[0].lstrip("+~")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The runs of a Hydra sweep, each as its list of single-value overrides, in the order
    ``python -m pilot.train -m`` runs them (that of Hydra's BasicSweeper: the cartesian product of the
    swept values, keys in order of first appearance, a repeated key taking the later value).

    Hydra's own parser reads the overrides, so ``a=1,2``, ``a=range(1,4)``, ``a=choice(x,y)``,
    quoting and escaping mean what they mean to Hydra; a parse error raises :class:`PackError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise PackError(f"cannot read the overrides: {err}") from None
    values: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise PackError(f"{key}: only lists, range() and choice() can be swept here, not intervals")
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values[key] = [f"{key}={override.get_value_element_as_str()}"]  # a repeated key keeps its place
    return [list(run) for run in product(*values.values())]


# ----------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Slot:
    """A place where one run executes: a device and its ``CUDA_VISIBLE_DEVICES`` value."""

    device: str  # the label in the table: the GPU id, or cpu0, cpu1, ...
    visible: str  # CUDA_VISIBLE_DEVICES of the run ("" on the CPU)

    @property
    def is_cpu(self) -> bool:
        return self.visible == ""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: the entries of that
    variable when it is set, else one id per GPU that ``nvidia-smi -L`` lists (none without it)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def parse_devices(spec: str | None, per_device: int) -> list[Slot]:
    """The slots of ``--devices`` (``0,1``: those GPUs; ``cpu:N``: N CPU devices; none: every GPU
    this process sees), ``per_device`` slots on each, interleaved (GPU 0, GPU 1, GPU 0, GPU 1, ...) so
    that a sweep smaller than the slots is spread over the devices."""
    if per_device < 1:
        raise PackError(f"--per-device {per_device}: at least one run per device")
    if spec is None:
        devices = [Slot(gpu, gpu) for gpu in visible_gpus()]
        if not devices:
            raise PackError("no GPU found (nvidia-smi, CUDA_VISIBLE_DEVICES); to run on the CPU, use --devices cpu:N")
    elif spec == "cpu" or spec.startswith("cpu:"):
        count = spec.partition(":")[2] or "1"
        if not count.isdigit() or int(count) < 1:
            raise PackError(f"--devices {spec}: write cpu:N with N >= 1 (N CPU devices)")
        devices = [Slot(f"cpu{i}", "") for i in range(int(count))]
    else:
        ids = [d.strip() for d in spec.split(",")]
        if not all(ids) or len(set(ids)) != len(ids):
            raise PackError(f"--devices {spec}: write GPU ids separated by commas, each once (e.g. 0,1)")
        devices = [Slot(gpu, gpu) for gpu in ids]
    return [device for _ in range(per_device) for device in devices]


# -------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run of the sweep and, once it has ended, how it went."""

    num: int
    overrides: list[str]
    slot: Slot | None = None
    returncode: int | None = None
    seconds: float = math.nan
    run_dir: Path | None = None
    log: Path | None = None
    acc_last: float = math.nan
    last_line: str = ""
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_handle: IO[bytes] | None = field(default=None, repr=False)
    _start: float = field(default=0.0, repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_overrides(run: Run, slot: Slot, sweep_dir: Path) -> list[str]:
    """The overrides the run's process gets: the sweep's, ``resume=auto`` (unless they choose how
    it starts), ``runtime.device=cpu`` on a CPU slot (unless they choose a device), and its run dir."""
    keys = {override_key(o) for o in run.overrides}
    extra = []
    if not keys & set(START_KEYS):
        extra.append("resume=auto")
    if slot.is_cpu and "runtime.device" not in keys:
        extra.append("runtime.device=cpu")
    run_dir = f"{sweep_dir}/{run.num}_{RUN_DIR_NAME}"
    return [*run.overrides, *extra, f"hydra.run.dir={hydra_quote(run_dir)}"]


def hydra_quote(value: str) -> str:
    """``value`` single-quoted for a Hydra override (interpolations in it still resolve)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_env(slot: Slot, cpu_slots: int) -> dict[str, str]:
    """The environment of a run: ``CUDA_VISIBLE_DEVICES`` pinned to its slot's GPU (empty on the CPU);
    on the CPU also ``OMP_NUM_THREADS``, the cores shared among the CPU slots (unless already set)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot.visible)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if slot.is_cpu and cpu_slots:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cpu_slots)))
    return env


def start(run: Run, slot: Slot, sweep_dir: Path, command: Sequence[str], cpu_slots: int) -> None:
    """Start ``run`` on ``slot``; its output goes to ``<sweep dir>/logs/<num>.log``."""
    run.slot = slot
    run.log = sweep_dir / LOGS_DIR / f"{run.num}.log"
    argv = [*command, *run_overrides(run, slot, sweep_dir)]
    run._log_handle = open(run.log, "wb")
    header = f"# device {slot.device} (CUDA_VISIBLE_DEVICES={slot.visible!r}): {subprocess.list2cmdline(argv)}\n"
    run._log_handle.write(header.encode())
    run._log_handle.flush()
    run._start = time.perf_counter()
    env = run_env(slot, cpu_slots)
    run._process = subprocess.Popen(argv, stdout=run._log_handle, stderr=subprocess.STDOUT, env=env)


def finish(run: Run, returncode: int, sweep_dir: Path) -> None:
    """Record how ``run`` ended: exit status, time, run directory, A_last, last line of its log."""
    run.returncode = returncode
    run.seconds = time.perf_counter() - run._start
    if run._log_handle is not None:
        run._log_handle.close()
    run._process = run._log_handle = None
    dirs = sorted(p for p in sweep_dir.glob(f"{run.num}_*") if p.is_dir())
    run.run_dir = dirs[0] if len(dirs) == 1 else None
    run.acc_last = last_accuracy(run.run_dir / "sessions.csv") if run.run_dir else math.nan
    run.last_line = last_line(run.log) if run.log else ""


def last_accuracy(sessions_csv: Path) -> float:
    """``acc`` of the last row of a ``sessions.csv`` (NaN if there is none)."""
    try:
        with open(sessions_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return float(rows[-1]["acc"]) if rows else math.nan
    except (OSError, KeyError, ValueError):
        return math.nan


def last_line(log: Path) -> str:
    """The last non-empty line of a log (where ``pilot.train`` prints ``ErrorClass: message``)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_all(
    runs: list[Run],
    slots: list[Slot],
    sweep_dir: Path,
    command: Sequence[str] = (sys.executable, "-m", "pilot.train"),
    poll_s: float = 0.2,
    out: IO[str] | None = None,
) -> list[Run]:
    """Run every run, at most one per slot at a time, the next pending run taking the first free
    slot; report each run to ``out`` (stdout) as it ends, a failure with its log. On Ctrl-C, wait for
    the running ones (they stop cleanly, saving what they finished) and return with the rest unstarted."""
    out = out or sys.stdout
    (sweep_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    cpu_slots = sum(slot.is_cpu for slot in slots)
    pending = list(runs)
    running: dict[int, Run] = {}  # slot index -> run
    try:
        while pending or running:
            for index, slot in enumerate(slots):
                if index not in running and pending:
                    running[index] = pending.pop(0)
                    start(running[index], slot, sweep_dir, command, cpu_slots)
            time.sleep(poll_s)
            for index, run in list(running.items()):
                assert run._process is not None
                returncode = run._process.poll()
                if returncode is not None:
                    del running[index]
                    finish(run, returncode, sweep_dir)
                    _report(run, out)
    except KeyboardInterrupt:
        print(f"Interrupted: waiting for the {len(running)} running run(s) to stop", file=out, flush=True)
        for run in running.values():
            assert run._process is not None
            try:
                returncode = run._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run._process.terminate()
                returncode = run._process.wait()
            finish(run, returncode, sweep_dir)
    return runs


def _report(run: Run, out: IO[str]) -> None:
    assert run.slot is not None
    if run.ok:
        print(f"run {run.num} done on {run.slot.device} in {run.seconds:.1f}s", file=out, flush=True)
    else:
        status = f"FAILED on {run.slot.device} (exit status {run.returncode})"
        print(f"run {run.num} {status}: {run.last_line}  log: {run.log}", file=out, flush=True)


# ------------------------------------------------------------------------------------ report


def summary_rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One row per run for the table and ``summary.csv`` (unstarted runs have an empty status)."""
    rows = []
    for run in runs:
        rows.append(
            {
                "run": str(run.num),
                "device": run.slot.device if run.slot else "",
                "rc": "" if run.returncode is None else str(run.returncode),
                "seconds": "" if math.isnan(run.seconds) else f"{run.seconds:.1f}",
                "acc_last": "" if math.isnan(run.acc_last) else f"{run.acc_last:.2f}",
                "overrides": " ".join(run.overrides),
                "run_dir": str(run.run_dir or ""),
                "log": str(run.log or ""),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """The summary as aligned text: run, device, rc, seconds, A_last, overrides."""
    columns = [("run", "run"), ("device", "device"), ("rc", "rc"), ("seconds", "seconds"), ("acc_last", "A_last")]
    lines = [[title for _, title in columns] + ["overrides"]]
    lines += [[row[key] or "-" for key, _ in columns] + [row["overrides"]] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def write_summary(rows: Sequence[dict[str, str]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------- CLI


def default_sweep_dir(overrides: Sequence[str]) -> Path:
    """``<results dir>/multirun/<date>_<time>``, as ``python -m pilot.train -m`` names its sweeps; the
    results dir is a fixed ``paths.results_dir=`` override, else ``PILOT_RESULTS_DIR``, else results."""
    results = os.environ.get("PILOT_RESULTS_DIR", "results")
    for override in overrides:
        if override_key(override) == "paths.results_dir" and "," not in override:
            results = override.split("=", 1)[1].strip("'\"")
    return Path(results) / "multirun" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.launch.pack",
        description="Run a Hydra sweep of pilot.train, K runs at a time on each GPU of this machine.",
        epilog="example: python -m pilot.launch.pack --per-device 2 -- +method=l2p,ease seed=1,2,3 dataset=cifar100",
    )
    parser.add_argument("--per-device", type=int, default=1, metavar="K", help="runs at a time on each device (1)")
    parser.add_argument(
        "--devices",
        default=None,
        metavar="IDS",
        help="GPU ids as CUDA_VISIBLE_DEVICES names them (0,1), or cpu:N for N CPU devices; default: every GPU",
    )
    parser.add_argument("--sweep-dir", type=Path, default=None, help="default: <results dir>/multirun/<date>_<time>")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their devices, run nothing")
    parser.add_argument("overrides", nargs="*", help="pilot.train overrides, swept as with -m (after --)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pilot.launch.pack``; returns the exit status (0: every run succeeded)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = [o for o in args.overrides if o != "--"]
        for override in overrides:
            if override in ("-m", "--multirun") or override_key(override) in RESERVED_KEYS:
                raise PackError(f"{override}: the launcher sets this itself; leave it out")
        runs = [Run(num, job) for num, job in enumerate(expand_sweep(overrides))]
        slots = parse_devices(args.devices, args.per_device)
    except PackError as err:
        print(f"PackError: {err}", file=sys.stderr)
        return 2
    sweep_dir = (args.sweep_dir or default_sweep_dir(overrides)).absolute()
    print(f"{len(runs)} run(s) on {len(slots)} slot(s) ({', '.join(s.device for s in slots)}); sweep dir {sweep_dir}")
    if args.dry_run:
        for run in runs:
            print(f"  {run.num}: {' '.join(run.overrides)}")
        return 0
    run_all(runs, slots, sweep_dir)
    rows = summary_rows(runs)
    write_summary(rows, sweep_dir / SUMMARY_FILE)
    print(format_table(rows))
    failed = [run for run in runs if not run.ok]
    print(f"{len(runs) - len(failed)} of {len(runs)} run(s) succeeded; summary in {sweep_dir / SUMMARY_FILE}")
    for run in failed:
        status = "not started" if run.returncode is None else f"exit status {run.returncode}"
        print(f"  run {run.num} {status}: {run.last_line}  log: {run.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
