"""What a run's numbers rest on, written into every row: the evaluation protocol (``eval_protocol``:
per-sample or batch-dependent predictions, class-sorted or shuffled test batches), the data hash
and the backbone weights hash; and how ``pilot.tables`` uses them (marks and footnotes for
batch-dependent evaluation, never averaging runs on different data or weights)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, compose_config, run_config

from pilot import tables
from pilot.checkpoint import load_checkpoint, save_checkpoint
from pilot.data.datasets import embedded_fashion_mnist, synthetic
from pilot.data.images import ClassificationData, FileImages
from pilot.data.manifest import manifest_hash
from pilot.data.pipeline import TEST, DataPipeline
from pilot.errors import ResumeError
from pilot.loop import RunInterrupted, build_data, build_model
from pilot.provenance import array_hash, data_hash
from pilot.sinks.csv import CsvSink
from pilot.tables.results import protocol_mark

NOISY = ["dataset.noise=250"]  # SimpleCIL below 100% on the synthetic classes
SORTED_NOTE = (
    "predictions depend on the class-sorted test batch. Batch-wise prompt voting (L2P, DualPrompt): the test "
    "batch votes for the prompt, which leaks label information"
)


# ---------------------------------------------------------------------------------------------
# The eval_protocol column


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+method=simplecil"], "per-sample, class-sorted"),
        (["+method=simplecil", "scenario.shuffle_test=true"], "per-sample, shuffled"),
        (["+method=l2p", "method.epochs=1"], "batch-vote(b=16), class-sorted"),
        (["+method=l2p", "method.epochs=1", "method.batchwise_prompt_eval=false"], "per-sample, class-sorted"),
        (["+method=l2p", "method.epochs=1", "scenario.shuffle_test=true"], "batch-vote(b=16), shuffled"),
    ],
)
def test_eval_protocol_column(tmp_path, overrides, expected):
    run_dir = tmp_path / "run"
    run_config(FAST + overrides, run_dir)
    for name in ("sessions.csv", "matrix.csv"):
        assert pd.read_csv(run_dir / name)["eval_protocol"].unique().tolist() == [expected]
    assert json.loads((run_dir / "sessions.json").read_text())["eval_protocol"] == expected


def test_learners_declare_whether_predictions_depend_on_the_batch(tmp_path):
    def protocol(*overrides: str) -> str:
        cfg = compose_config(FAST + list(overrides), tmp_path)
        return build_model(cfg, build_data(cfg)).learner.eval_protocol

    assert protocol("+method=ease") == "per-sample"
    assert protocol("+method=coda", "method.pool_size=12") == "per-sample"
    assert protocol("+method=dualprompt") == "batch-vote(b=24)"
    assert protocol("+method=dualprompt", "method.vote_batch_size=8") == "batch-vote(b=8)"
    # The reference's E-prefix layout hands a sample its neighbours' prefixes: batch-dependent too.
    assert protocol(
        "+method=dualprompt", "method.batchwise_prompt_eval=false", "method.reference_prefix_layout=true"
    ) == ("batch-prefix(b=24)")


# ---------------------------------------------------------------------------------------------
# Shuffled test batches


def test_shuffled_order_is_a_seeded_permutation_fixed_for_the_run(tmp_path):
    cfg = compose_config(FAST + ["+method=simplecil", "scenario.shuffle_test=true"], tmp_path)
    parts = build_data(cfg)
    pipeline = DataPipeline(parts.data, parts.scenario, None, parts.runtime, seed=1993)
    order = pipeline.eval_batches(TEST, range(0, 10), 1000).indices
    assert sorted(order.tolist()) == sorted(pipeline.indices(TEST, range(0, 10)).tolist())
    assert order.tolist() != pipeline.indices(TEST, range(0, 10)).tolist()  # not class-sorted
    assert pipeline.eval_batches(TEST, range(0, 10), 1000).indices.tolist() == order.tolist()
    # After an earlier session the seen classes come in the same relative order.
    early = pipeline.eval_batches(TEST, range(0, 4), 1000).indices.tolist()
    assert early == [i for i in order.tolist() if i in set(early)]
    other_seed = DataPipeline(parts.data, parts.scenario, None, parts.runtime, seed=7)
    assert other_seed.eval_batches(TEST, range(0, 10), 1000).indices.tolist() != order.tolist()


def _logits_by_id(learner, pipeline: DataPipeline) -> torch.Tensor:
    out = torch.empty(len(pipeline.labels(TEST)), pipeline.scenario.num_classes)
    for batch in pipeline.eval_batches(TEST, range(0, pipeline.scenario.num_classes), learner.eval_batch_size):
        out[batch.ids] = learner.predict(batch).float()
    return out


@pytest.mark.parametrize("vote", [True, False])
def test_shuffled_test_order_changes_l2p_voting_predictions_only(tmp_path, vote):
    """An untrained L2P (random prompts, keys and head) over all classes, scored on the same test images
    in class-sorted and in shuffled order: with batch-wise voting the groups that vote differ, and so do
    the predictions; with per-sample selection every sample's logits stay the same."""
    cfg = compose_config(FAST + ["+method=l2p", f"method.batchwise_prompt_eval={str(vote).lower()}"], tmp_path)
    parts = build_data(cfg)
    model = build_model(cfg, parts)
    learner = model.learner.eval()
    for info in parts.scenario.sessions:
        learner.begin_session(info)
    shuffled_scenario = dataclasses.replace(parts.scenario, shuffle_test=True)
    shuffled = DataPipeline(parts.data, shuffled_scenario, model.pipeline.transforms, parts.runtime, seed=1993)
    sorted_logits = _logits_by_id(learner, model.pipeline)
    shuffled_logits = _logits_by_id(learner, shuffled)
    changed = (sorted_logits.argmax(1) != shuffled_logits.argmax(1)).sum().item()
    if vote:
        assert changed > 0 and not torch.allclose(sorted_logits, shuffled_logits, atol=1e-3)
    else:
        assert changed == 0
        torch.testing.assert_close(sorted_logits, shuffled_logits, atol=1e-5, rtol=1e-5)


def test_shuffled_test_order_leaves_simplecil_accuracy_unchanged(tmp_path):
    columns = ["acc", "acc_top5", "acc_old", "acc_new", "acc_avg", "forgetting", "n_test"]
    frames = {}
    for shuffle in ("false", "true"):
        run_dir = tmp_path / shuffle
        run_config(FAST + NOISY + ["+method=simplecil", f"scenario.shuffle_test={shuffle}"], run_dir)
        frames[shuffle] = pd.read_csv(run_dir / "sessions.csv")
    assert frames["false"]["acc"].iloc[-1] < 100
    pd.testing.assert_frame_equal(frames["false"][columns], frames["true"][columns])
    assert frames["false"]["run_id"].iloc[0] != frames["true"]["run_id"].iloc[0]  # another setting


# ---------------------------------------------------------------------------------------------
# Data and weights hashes


def test_every_row_names_the_data_and_the_weights(tmp_path):
    run_dir = tmp_path / "run"
    run_config(FAST + ["+method=simplecil"], run_dir)
    data = synthetic()  # the FAST dataset's defaults
    expected = array_hash(
        [("train", data.train.images, data.train.labels), ("test", data.test.images, data.test.labels)]
    )
    for name in ("sessions.csv", "matrix.csv"):
        frame = pd.read_csv(run_dir / name, dtype=str)
        assert frame["data_hash"].unique().tolist() == [expected]
        assert frame["weights_hash"].unique().tolist() == ["random-init"]  # pretrained=false: follows the seed
    info = json.loads((run_dir / "sessions.json").read_text())
    assert (info["data_hash"], info["weights_hash"]) == (expected, "random-init")
    assert len(expected) == 12 and int(expected, 16) >= 0


def test_array_hash_sees_pixels_and_labels():
    data = synthetic(num_classes=3, train_per_class=4, test_per_class=2)
    splits = [("train", data.train.images, data.train.labels), ("test", data.test.images, data.test.labels)]
    reference = array_hash(splits)
    assert array_hash(splits) == reference == data_hash(data)
    pixels = data.train.images.clone()
    pixels[0, 0, 0, 0] ^= 1
    assert array_hash([("train", pixels, data.train.labels), splits[1]]) != reference
    labels = data.train.labels.copy()
    labels[[0, -1]] = labels[[-1, 0]]
    assert array_hash([("train", data.train.images, labels), splits[1]]) != reference


def test_embedded_fashion_mnist_hash_is_cheap():
    data = embedded_fashion_mnist()
    start = time.perf_counter()
    first = data_hash(data)
    elapsed = time.perf_counter() - start
    assert first == data_hash(embedded_fashion_mnist())
    assert elapsed < 1.0, f"hashing the embedded Fashion-MNIST subset took {elapsed:.2f}s"


def test_weights_hash_covers_every_weight():
    from pilot.backbones.factory import weights_hash

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reference = weights_hash(model)
    assert len(reference) == 12 and weights_hash(model) == reference
    with torch.no_grad():
        model[0].weight[2, 3] += 1e-6
    assert weights_hash(model) != reference
    torch.manual_seed(0)
    again = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert weights_hash(again) == reference  # the same weights built again
    again[1].running_mean += 1  # buffers count too
    assert weights_hash(again) != reference


def test_image_folder_data_hash_comes_from_the_manifest(tmp_path):
    root = tmp_path / "prepared"
    paths = [root / "train" / "a" / "0.jpg", root / "train" / "b" / "0.jpg"]
    train = FileImages(paths, np.array([0, 1]), root / "train")
    test = FileImages([root / "test" / "a" / "0.jpg", root / "test" / "b" / "0.jpg"], np.array([0, 1]), root / "test")
    data = ClassificationData("folders", ["a", "b"], train, test)
    assert data_hash(data) is None  # not prepared: unknown
    root.mkdir()
    manifest = b"path,class,split,size,sha256\n"  # what pilot.data prepare records (here: no files)
    digest = hashlib.sha256(manifest).hexdigest()
    (root / "manifest.csv").write_bytes(manifest)
    (root / "manifest.sha256").write_text(f"{digest}  manifest.csv\n")
    assert data_hash(data) == digest[:12] == manifest_hash(root)


def test_resume_refuses_other_data(tmp_path):
    overrides = FAST + ["+method=simplecil"]
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_config(overrides + ["debug.stop_after_session=0"], run_dir)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["data_hash"] and checkpoint["weights_hash"] == "random-init"
    save_checkpoint(run_dir, {**checkpoint, "data_hash": "000000000000"})
    with pytest.raises(ResumeError, match="other dataset .*data_hash 000000000000"):
        run_config(overrides + ["resume=true"], run_dir)


# ---------------------------------------------------------------------------------------------
# pilot.tables: hashes and protocol marks


def write_run(
    run_dir: Path,
    seed: int,
    acc: float,
    *,
    group_id: str = "g0000000000a",
    method: str = "l2p",
    extra: dict | None = None,
    config: bool = True,
) -> Path:
    """A finished two-session run through pilot's CsvSink; ``extra`` = data_hash, weights_hash,
    eval_protocol (left out: the columns stay empty, as in older files)."""
    info = {
        "run_id": f"r{seed}{run_dir.name}",
        "group_id": group_id,
        "method": method,
        "dataset": "cifar100",
        "backbone": "vit_b16_in1k",
        "scenario": "B0Inc50",
        "seed": seed,
        "num_sessions": 2,
        **(extra or {}),
    }
    run_dir.mkdir(parents=True)
    sink = CsvSink()
    sink.open(run_dir, info, {}, [])
    for k, a in enumerate([90.0, acc]):
        sink.write({"session": k, "n_seen": 50 * (k + 1), "acc": a, "acc_avg": (90.0 + a * k) / (k + 1)}, [])
    sink.close({})
    if config:
        cfg = {"seed": seed, "labels": {"method": method, "dataset": "cifar100", "backbone": "vit_b16_in1k"}}
        cfg["method"] = {"_target_": f"pilot.learners.{method}.X", "lr": 0.01}
        (run_dir / "config.yaml").write_text(json.dumps(cfg))
    return run_dir


def load(root: Path) -> tuple[tables.Results, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = tables.load_results([root])
    return results, [str(w.message) for w in caught if issubclass(w.category, tables.TablesWarning)]


def test_tables_never_average_runs_on_different_data_or_weights(tmp_path):
    root = tmp_path / "results"
    write_run(root / "a1", 1, 80.0, extra={"data_hash": "aaaaaaaaaaaa", "weights_hash": "w1"})
    write_run(root / "a2", 2, 82.0, extra={"data_hash": "aaaaaaaaaaaa", "weights_hash": "w1"})
    write_run(root / "b3", 3, 60.0, extra={"data_hash": "bbbbbbbbbbbb", "weights_hash": "w1"})
    results, messages = load(root)
    assert len(messages) == 1
    message = messages[0]
    assert "different data or backbone weights" in message and "split into 2 rows" in message
    assert f"data_hash: aaaaaaaaaaaa ({root / 'a1'}, {root / 'a2'}) vs bbbbbbbbbbbb ({root / 'b3'})" in message
    cells = tables.summarize(results.runs, ["acc_last"]).set_index("variant")
    assert cells.loc["data_hash=aaaaaaaaaaaa", ["mean", "n"]].tolist() == [81.0, 2]
    assert cells.loc["data_hash=bbbbbbbbbbbb", ["mean", "n"]].tolist() == [60.0, 1]


def test_tables_refuse_conflicting_hashes_when_a_run_cannot_be_placed(tmp_path):
    root = tmp_path / "results"
    write_run(root / "a1", 1, 80.0, extra={"weights_hash": "111111111111"})
    write_run(root / "b2", 2, 70.0, extra={"weights_hash": "222222222222"})
    write_run(root / "old3", 3, 75.0)  # an older file: no hash, so it belongs to neither part for sure
    results, messages = load(root)
    assert results.runs.empty and len(results.incomplete) == 3
    assert "no weights_hash to tell them apart" in messages[0] and "<unknown> (" in messages[0]
    assert set(results.incomplete["reason"].str.contains("different data or backbone weights")) == {True}


def test_unknown_hashes_match_any(tmp_path):
    root = tmp_path / "results"
    write_run(root / "a1", 1, 80.0, extra={"data_hash": "aaaaaaaaaaaa", "weights_hash": "w1"})
    write_run(root / "old2", 2, 84.0)  # written before the columns existed: empty cells
    path = root / "old2" / "sessions.csv"
    frame = pd.read_csv(path).drop(columns=["data_hash", "weights_hash", "eval_protocol", "acc_val", "acc_val_avg"])
    frame.to_csv(path, index=False)  # and without the columns at all
    results, messages = load(root)
    assert messages == []
    cell = tables.summarize(results.runs, ["acc_last"]).iloc[0]
    assert (cell["mean"], cell["n"]) == (82.0, 2)


def test_table_marks_batch_dependent_evaluation(tmp_path):
    root = tmp_path / "results"
    write_run(root / "l2p", 1, 80.0, extra={"eval_protocol": "batch-vote(b=16), class-sorted"}, group_id="g1")
    write_run(
        root / "dualprompt",
        1,
        78.0,
        method="dualprompt",
        extra={"eval_protocol": "batch-vote(b=24), shuffled"},
        group_id="g2",
    )
    write_run(
        root / "simplecil",
        1,
        70.0,
        method="simplecil",
        extra={"eval_protocol": "per-sample, class-sorted"},
        group_id="g3",
    )
    write_run(root / "ease", 1, 72.0, method="ease", group_id="g4")  # older file: protocol unknown, no mark
    out = tmp_path / "out"
    assert tables.main([str(root), "--out", str(out), "--metrics", "acc_last"]) == 0
    markdown = (out / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "**80.00** †" in rows["l2p"] and "78.00 ‡" in rows["dualprompt"]
    assert "†" not in rows["simplecil"] + rows["ease"] and "‡" not in rows["simplecil"] + rows["ease"]
    assert f"† {SORTED_NOTE}" in markdown
    assert "‡ batch-dependent predictions on shuffled test batches" in markdown
    latex = (out / "table.tex").read_text()
    assert r"80.00}$^\dagger$" in latex and r"78.00$^\ddagger$" in latex and "leaks label information" in latex
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert table.loc["l2p", "eval_protocol"] == "batch-vote(b=16), class-sorted"
    assert pd.isna(table.loc["ease", "eval_protocol"])


def test_protocol_marks():
    assert protocol_mark("per-sample, class-sorted") == protocol_mark("per-sample, shuffled") == ""
    assert protocol_mark(None) == protocol_mark(float("nan")) == protocol_mark("") == ""
    assert protocol_mark("batch-vote(b=16), class-sorted") == "†"
    assert protocol_mark("batch-prefix(b=24), class-sorted") == "†"
    assert protocol_mark("batch-vote(b=16), shuffled") == "‡"
    assert protocol_mark("batch-vote(b=16), shuffled; batch-vote(b=16), class-sorted") == "†"
