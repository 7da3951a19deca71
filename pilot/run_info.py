"""Identity of a run: labels for its rows and hashes of its resolved configuration."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# Keys that change where or how results are written, not what is computed.
NON_SEMANTIC_KEYS = ("paths", "logger", "resume", "overwrite", "debug", "labels", "hydra")
# Runtime settings that change results; the others (workers, progress bars...) only change speed.
SEMANTIC_RUNTIME_KEYS = ("precision", "tf32")


def config_hash(cfg: DictConfig, ignore_seed: bool = False) -> str:
    """First 12 hex digits of the SHA-256 of the resolved config, without non-semantic keys.

    With ``ignore_seed`` the seed is replaced by a constant *before* resolving, so that values
    interpolated from it (the class-order seed) do not split the seeds of one setting apart.
    """
    if ignore_seed:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.seed = 0
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    kept = {k: v for k, v in container.items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(kept.get("runtime"), dict):
        kept["runtime"] = {k: v for k, v in kept["runtime"].items() if k in SEMANTIC_RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_run_info(cfg: DictConfig, scenario_name: str, num_sessions: int) -> dict[str, Any]:
    """``run_id`` identifies the run (its whole config); ``group_id`` the setting with the seed
    left out, so that tables can group the seeds of one setting."""
    return {
        "run_id": config_hash(cfg),
        "group_id": config_hash(cfg, ignore_seed=True),
        "method": cfg.labels.method,
        "dataset": cfg.labels.dataset,
        "backbone": cfg.labels.backbone,
        "scenario": scenario_name,
        "seed": int(cfg.seed),
        "num_sessions": num_sessions,
    }
