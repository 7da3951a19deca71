"""Runs a list of pilot runs inside one torchrun launch (tests/test_distributed.py).

    torchrun --nproc_per_node=2 tests/helpers/ddp_worker.py JOBS.json

``JOBS.json``: a list of ``{"overrides": [...], "run_dir": "..."}``. Every rank runs every job in the
same order (a job interrupted by ``debug.stop_after_session`` is expected to stop). One launch for all
jobs keeps the test's cost to one start of the processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pilot import distributed
from pilot.config import compose_config
from pilot.loop import RunInterrupted, run


def main(jobs_file: str) -> None:
    distributed.init_from_env()
    for job in json.loads(Path(jobs_file).read_text()):
        try:
            run(compose_config(job["overrides"]), job["run_dir"])
        except RunInterrupted:
            pass
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
