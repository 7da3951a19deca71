"""Entry point: ``python -m pilot.train +method=NAME [group=option ...] [key=value ...]``.

Composes ``configs/train.yaml`` with Hydra and calls :func:`pilot.run.run` in the run directory.
A :class:`PilotError` (bad input) is printed as one clear message and exits with status 2.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pilot.config import CONFIG_DIR, apply_method_presets, available_options, cfg_choice, register_resolvers
from pilot.errors import PilotError

log = logging.getLogger("pilot")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pilot.run import run  # imported here so that `--help` and config errors stay fast

    apply_method_presets(cfg, cfg_choice("method"), HydraConfig.get().overrides.task)
    try:
        table = run(cfg, HydraConfig.get().runtime.output_dir)
    except PilotError as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    return float(table["acc"].iloc[-1]) if len(table) else None


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


if __name__ == "__main__":
    _require_method(sys.argv[1:])
    main()
