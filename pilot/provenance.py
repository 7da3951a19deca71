"""Identity of a run: labels for its rows, hashes of its resolved configuration, of its data and of
its backbone's weights, and the evaluation protocol it was scored with."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Iterable, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from pilot.data.manifest import MANIFEST_SHA256, manifest_hash

if TYPE_CHECKING:
    from pilot.data.images import ClassificationData

log = logging.getLogger(__name__)

# Keys that change where or how results are written, not what is computed.
NON_SEMANTIC_KEYS = ("paths", "logger", "resume", "overwrite", "debug", "labels", "hydra")
# Runtime settings that change results; the others (workers, progress bars...) only change speed.
SEMANTIC_RUNTIME_KEYS = ("precision", "tf32")
# Keys added after runs had been recorded without them, with the value that behaves as those runs did.
# At that value they are left out of the hashes (and of the configs tables compare), so that older runs
# keep their run_id and group_id: they resume, and they average with newer runs of the same setting.
LATER_KEY_DEFAULTS: dict[tuple[str, str], Any] = {
    ("scenario", "val_fraction"): 0.0,
    ("scenario", "shuffle_test"): False,
}
# What make_provenance leaves unknown until the data and the backbone are built (None = unknown).
RUN_EXTRA_KEYS = ("data_hash", "weights_hash", "eval_protocol")
HASH_DIGITS = 12


def drop_later_defaults(container: dict[str, Any]) -> dict[str, Any]:
    """``container`` (a resolved config as plain dicts) without the keys of :data:`LATER_KEY_DEFAULTS`
    that hold their default value (a shallow copy where something is dropped)."""
    out = dict(container)
    for (group, key), default in LATER_KEY_DEFAULTS.items():
        node = out.get(group)
        if isinstance(node, dict) and key in node and node[key] == default:
            out[group] = {k: v for k, v in node.items() if k != key}
    return out


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
    kept = {k: v for k, v in drop_later_defaults(cast(dict[str, Any], container)).items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(kept.get("runtime"), dict):
        kept["runtime"] = {k: v for k, v in kept["runtime"].items() if k in SEMANTIC_RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:HASH_DIGITS]


def make_provenance(cfg: DictConfig, scenario_name: str, num_sessions: int) -> dict[str, Any]:
    """``run_id`` identifies the run (its whole config); ``group_id`` the setting with the seed
    left out, so that tables can group the seeds of one setting. ``data_hash``, ``weights_hash`` and
    ``eval_protocol`` start as None; the run loop fills them in once the data and the learner exist."""
    return {
        "run_id": config_hash(cfg),
        "group_id": config_hash(cfg, ignore_seed=True),
        "method": cfg.labels.method,
        "dataset": cfg.labels.dataset,
        "backbone": cfg.labels.backbone,
        "scenario": scenario_name,
        "seed": int(cfg.seed),
        "num_sessions": num_sessions,
        **dict.fromkeys(RUN_EXTRA_KEYS),
    }


# ------------------------------------------------------------------------------------ data hash
def array_hash(splits: Iterable[tuple[str, Any, np.ndarray]]) -> str:
    """First 12 hex digits of a SHA-256 over ``(name, uint8 image tensor, labels)`` splits: each
    split's name, shape and dtype, its pixel bytes and its labels as int64.

    Cost: SHA-256 speed, about 0.4 GB/s on one core of a busy 2-core x86 machine: 0.5 s for
    CIFAR-100 (50,000 + 10,000 images of 32x32x3, 184 MB), 10 ms for the embedded Fashion-MNIST
    subset (3,000 + 1,000 images of 28x28, 3 MB)."""
    digest = hashlib.sha256()
    for name, images, labels in splits:
        pixels = images.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(images.shape)}|{images.dtype}\n".encode())
        digest.update(pixels.numpy().data)
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return digest.hexdigest()[:HASH_DIGITS]


def data_hash(data: ClassificationData) -> str | None:
    """What identifies the images and labels a run learns from and is scored on.

    In-memory datasets (CIFAR-100, Fashion-MNIST, synthetic): :func:`array_hash` of the loaded arrays,
    which is what the run really reads, whether or not ``pilot.data prepare`` wrote a manifest for its
    root (so a prepared and an unprepared copy of the same data agree). Image-file datasets: the
    manifest hash of the prepared root (the folder above ``train/`` and ``test/``;
    :func:`pilot.data.manifest.manifest_hash`), or None (unknown) when it was not prepared."""
    from pilot.data.images import ArrayImages, FileImages

    train, test = data.train, data.test
    if isinstance(train, ArrayImages) and isinstance(test, ArrayImages):
        return array_hash([("train", train.images, train.labels), ("test", test.images, test.labels)])
    roots = {split.root.parent for split in (train, test) if isinstance(split, FileImages)}
    if len(roots) != 1:
        return None
    found = manifest_hash(next(iter(roots)))
    if found is None:
        log.info("dataset %s: no %s under %s, so data_hash is unknown", data.name, MANIFEST_SHA256, *roots)
    return found


# ------------------------------------------------------------------------------ eval protocol
def eval_protocol(learner_protocol: str, shuffled: bool) -> str:
    """``"<learner's protocol>, <order>"``: e.g. ``per-sample, class-sorted`` or
    ``batch-vote(b=24), shuffled``. The learner says whether its predictions depend on the other
    samples of a batch (:attr:`pilot.learners.base.Learner.eval_protocol`); the order says whether test
    batches hold one class at a time (the reference) or a seeded random mix (``scenario.shuffle_test``)."""
    return f"{learner_protocol}, {'shuffled' if shuffled else 'class-sorted'}"
