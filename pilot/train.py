"""Entry point: ``python -m pilot.train +method=NAME [group=option ...] [key=value ...]``, or the
``pilot-train`` console script with the same arguments.

Composes ``configs/train.yaml`` with Hydra, checks the composed config, and only then imports the
run loop (:func:`pilot.loop.run`, which loads torch) and runs it in the run directory. ``--help`` and
configuration mistakes are therefore answered without waiting for torch. A :class:`PilotError`
(bad input, or an interruption) ends the process with one line ``ErrorClass: message`` on stderr
and the error's ``exit_code`` (2 unless the error says otherwise); ``HYDRA_FULL_ERROR=1`` adds the
traceback.
"""

from __future__ import annotations

import os

# Before torch (imported later, by pilot.loop) loads OpenMP: idle OpenMP threads sleep instead of
# spinning, which on a small, busy CPU machine otherwise slows small tensor operations badly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import NoReturn  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pilot.config import (  # noqa: E402
    CONFIG_DIR,
    apply_method_presets,
    available_options,
    cfg_choice,
    register_resolvers,
    validate_config,
)
from pilot.errors import PilotError  # noqa: E402

log = logging.getLogger("pilot")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        apply_method_presets(cfg, cfg_choice("method"), HydraConfig.get().overrides.task)
        validate_config(cfg)
        from pilot.loop import run  # only now: importing it loads torch, timm and the learners

        table = run(cfg, HydraConfig.get().runtime.output_dir)
    except PilotError as err:
        exit_on_error(err)
    return float(table["acc"].iloc[-1]) if len(table) else None


def exit_on_error(err: PilotError) -> NoReturn:
    """Report ``err`` as one line on stderr (and in the run's log file, if Hydra opened one) and exit
    with its ``exit_code``. The line is printed directly, so it appears even where logging is not set
    up; with ``HYDRA_FULL_ERROR=1`` the traceback comes first."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(err)
    line = f"{type(err).__name__}: {err}"
    _write_to_log_files(line)
    print(line, file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", 2))


def _write_to_log_files(line: str) -> None:
    """Hand ``line`` to the file handlers that ``log`` reaches (Hydra's ``train.log``), not to the console
    ones: the console gets it once, on stderr, from :func:`exit_on_error`."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (line,), None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


def _require_method(argv: list[str]) -> None:
    """Presets are loaded by the method's config: without ``+method=`` Hydra would only say that
    ``experiment`` cannot be overridden. Say what is missing instead."""
    words = [a for a in argv if not a.startswith("-")]
    if any(a.startswith("experiment=") for a in words) and not any(a.lstrip("+").startswith("method=") for a in words):
        print(
            f"ConfigError: No method chosen. Add +method=NAME, one of: {', '.join(available_options('method'))}",
            file=sys.stderr,
        )
        sys.exit(2)


def run_dir_pattern(started: float) -> str:
    """``hydra.run.dir`` of ``configs/train.yaml`` with its ``${now:FORMAT}`` replaced by the time
    ``started`` (rank 0's clock), other interpolations left for Hydra: every rank gets the same directory."""
    import time

    import yaml

    pattern = str(yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["hydra"]["run"]["dir"])
    moment = time.localtime(started)
    return re.sub(r"\$\{now:([^}]*)\}", lambda m: time.strftime(m[1], moment), pattern)


def _join_torchrun(argv: list[str]) -> list[str]:
    """Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1): join the process group, and return the
    overrides that make every rank use rank 0's run directory (its ``${now:...}``) and leave the run
    directory's files and log to rank 0. See :mod:`pilot.distributed`."""
    if "-m" in argv or "--multirun" in argv:
        print(
            "ConfigError: torchrun runs one sequence over several processes; a sweep (-m) cannot be split that "
            "way. Launch the sweep's runs one by one, or use hydra/launcher=slurm or pilot.launch.pack.",
            file=sys.stderr,
        )
        sys.exit(2)
    import time

    from pilot import distributed

    distributed.init_from_env()
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append("hydra.run.dir=" + run_dir_pattern(distributed.broadcast_object(time.time())))
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return extra


def cli() -> None:
    """``pilot-train`` and ``python -m pilot.train``: check for a method, then hand the arguments to Hydra."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:  # Hydra's help lists the groups; first say how a run is started
        print(
            "usage: pilot-train +method=NAME [group=option ...] [key=value ...]  (same as python -m pilot.train)\n"
            f"  +method: {', '.join(available_options('method'))}\n"
        )
    _require_method(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.argv += _join_torchrun(argv)
    main()


if __name__ == "__main__":
    cli()
