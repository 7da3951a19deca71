"""What an offline W&B run holds, read back from its ``.wandb`` file: training loss and learning rate
per epoch, per-session metrics against ``session``, the accuracy matrix as a table and a heat map,
the result files as an artifact, the group, the tags and the run's identity under ``pilot``.

The per-epoch values reach the sink through ``runtime.on_epoch`` (set by the run loop from
:func:`pilot.sinks.base.epoch_hook`); the unit tests at the end check that hook without W&B.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time

import pandas as pd
import pytest
import torch
from conftest import FAST, run_config

from pilot.learners.training import train_epochs
from pilot.runtime import Runtime
from pilot.sinks.base import Sink, epoch_hook

CODA = ["+method=coda", "scenario=b0inc5", "method.epochs=3", "method.batch_size=16"]  # 2 sessions x 3 epochs
LR0 = 0.001
# CODA's shifted cosine schedule with K = 3 (docs/methods.md §3.2): epochs 0 and 1 at lr_0.
EPOCH_LRS = [LR0, LR0, LR0 * math.cos(99 * math.pi / (200 * 2))]


def records_by_kind(records) -> dict[str, list]:
    kinds: dict[str, list] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        kinds.setdefault(kind, []).append(getattr(r, kind))
    return kinds


def nested_items(items) -> dict:
    """History items as a nested dict (media values come as several items under one key)."""
    out: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A CODA run on the tiny ViT with W&B offline, and the records of its ``.wandb`` file once the
    run's exit record has been flushed (wandb's service may write after ``finish`` returns)."""
    pytest.importorskip("wandb")
    from test_wandb_sink import read_wandb_records

    run_dir = tmp_path_factory.mktemp("wandb_rich") / "run"
    overrides = [o for o in FAST if o != "logger=csv"] + ["logger=wandb", *CODA]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(run_dir.parent / "wandb_data"))  # artifact staging: not in $HOME
        run_config(overrides, run_dir)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + 30
    while True:
        kinds = records_by_kind(read_wandb_records(files[0]))
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return run_dir, files[0].parent, kinds


def test_history_has_loss_and_lr_per_epoch(offline_run):
    _, _, kinds = offline_run
    rows = [nested_items(h.item) for h in kinds["history"]]
    epochs = [r for r in rows if "train/loss" in r]
    assert [e["train/epoch"] for e in epochs] == list(range(6))  # counted over the run
    assert [e["train/session"] for e in epochs] == [0, 0, 0, 1, 1, 1]
    assert [e["train/session_epoch"] for e in epochs] == [0, 1, 2, 0, 1, 2]
    assert [e["train/lr"] for e in epochs] == pytest.approx(EPOCH_LRS * 2)  # the lr each epoch ran with
    assert all(math.isfinite(e["train/loss"]) and e["train/loss"] > 0 for e in epochs)
    assert epochs[0]["train/loss"] != epochs[1]["train/loss"]  # the mean loss of each epoch
    assert not any("session" in e for e in epochs)  # epoch rows are not session rows
    metrics = {m.name: m.step_metric for m in kinds["metric"]}
    assert metrics["train/loss"] == metrics["train/lr"] == "train/epoch"


def test_session_metrics_are_logged_against_session(offline_run):
    run_dir, _, kinds = offline_run
    sessions = pd.read_csv(run_dir / "sessions.csv")
    rows = [r for r in (nested_items(h.item) for h in kinds["history"]) if "session" in r]
    assert [r["session"] for r in rows] == [0, 1]  # numbered from 0, as in sessions.csv
    for row, logged in zip(sessions.itertuples(), rows):
        assert logged["acc"] == pytest.approx(row.acc, abs=1e-4) and logged["n_seen"] == row.n_seen
    assert "forgetting" not in rows[0] and rows[1]["forgetting"] == pytest.approx(sessions["forgetting"][1], abs=1e-4)
    metrics = {m.name: m.step_metric for m in kinds["metric"]}
    for name in ("acc", "acc_avg", "forgetting", "accuracy_matrix", "accuracy_matrix_heatmap"):
        assert metrics[name] == "session", name


def test_accuracy_matrix_table_and_heatmap_each_session(offline_run):
    run_dir, wandb_dir, kinds = offline_run
    matrix = pd.read_csv(run_dir / "matrix.csv")
    rows = [r for r in (nested_items(h.item) for h in kinds["history"]) if "session" in r]
    for k, row in enumerate(rows):
        table, image = row["accuracy_matrix"], row["accuracy_matrix_heatmap"]
        assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (k + 1, k + 2)
        content = json.loads((wandb_dir / "files" / table["path"]).read_text())
        assert content["columns"] == ["session"] + [f"block {j}" for j in range(k + 1)]
        for i, line in enumerate(content["data"]):
            expected = matrix[matrix["session"] == i].sort_values("block")["acc"].tolist()
            assert line[0] == i and line[1 : i + 2] == pytest.approx(expected, abs=1e-3)
            assert all(v is None for v in line[i + 2 :])  # above the diagonal: empty
        assert image["_type"] == "image-file" and image["format"] == "png"
        png = wandb_dir / "files" / image["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image["width"] > 100
    paths = {f.path for files in kinds["files"] for f in files.files}
    assert sum(p.startswith("media/images/accuracy_matrix_heatmap") for p in paths) == 2
    assert sum(p.startswith("media/table/accuracy_matrix") for p in paths) == 2


def test_results_files_are_an_artifact(offline_run):
    run_dir, _, kinds = offline_run
    run_id = pd.read_csv(run_dir / "sessions.csv")["run_id"].iloc[0]
    (artifact,) = [a for a in kinds["artifact"] if a.type == "results"]
    assert artifact.name == f"results-{run_id}"
    contents = {c.path: c for c in artifact.manifest.contents}
    assert set(contents) == {"sessions.csv", "matrix.csv", "config.yaml"}
    for name, entry in contents.items():
        data = (run_dir / name).read_bytes()
        assert entry.size == len(data) and entry.digest == base64.b64encode(hashlib.md5(data).digest()).decode()


def test_group_tags_and_run_info_in_the_config(offline_run):
    run_dir, _, kinds = offline_run
    info = json.loads((run_dir / "sessions.json").read_text())
    (run,) = kinds["run"]
    assert run.run_group == info["group_id"]
    assert list(run.tags) == ["coda", "synthetic", "B0Inc5", "vit_test_tiny"]
    config = {}
    for update in [run.config.update] + [c.update for c in kinds.get("config", [])]:
        config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update})
    assert config["pilot"] == {k: v for k, v in info.items() if k != "sessions"}
    assert config["method"]["_target_"] == "pilot.learners.coda.CodaPrompt"


# ---------------------------------------------------------------------------------------------
# The hook without W&B


class Recorder(Sink):
    def __init__(self, fail: bool = False) -> None:
        self.epochs, self.fail = [], fail

    def open(self, run_dir, provenance, config, previous) -> None: ...

    def write(self, record, matrix_rows) -> None: ...

    def close(self, summary) -> None: ...

    def log_epoch(self, session, epoch, loss, lr) -> None:
        if self.fail:
            raise RuntimeError("listener broke")
        self.epochs.append((session, epoch, loss, lr))


def _train(runtime: Runtime, **kwargs) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batches = [torch.randn(4, 3) for _ in range(2)]
    return train_epochs(batches, 3, lambda x: model(x).pow(2).mean(), optimizer, runtime, scheduler, **kwargs)


def test_runtime_on_epoch_hears_every_epoch_with_its_lr():
    runtime = Runtime(torch.device("cpu"), progress=False)
    assert _train(runtime)  # no hook: as before
    recorder, broken = Recorder(), Recorder(fail=True)
    runtime.on_epoch = epoch_hook([broken, recorder], session=4)
    losses = _train(runtime)
    assert [(s, e) for s, e, _, _ in recorder.epochs] == [(4, 0), (4, 1), (4, 2)]
    assert [lr for *_, lr in recorder.epochs] == pytest.approx([0.1, 0.05, 0.025])
    assert [loss for _, _, loss, _ in recorder.epochs] == losses  # a failing listener stops nothing


def test_an_explicit_on_epoch_wins_over_the_runtime_hook():
    runtime = Runtime(torch.device("cpu"), progress=False)
    runtime.on_epoch = lambda *a: pytest.fail("the runtime hook must not be called")
    heard = []
    _train(runtime, on_epoch=lambda epoch, loss, lr: heard.append(epoch))
    assert heard == [0, 1, 2]


def test_a_failing_heatmap_keeps_the_scalars(tmp_path, monkeypatch, caplog):
    """Drawing is optional: the session's scalars are logged without media, with one warning."""
    pytest.importorskip("wandb")
    import pilot.tables.plots as plots
    from pilot.sinks.wandb import WandbSink

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "heatmap_figure", broken)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    sink = WandbSink(mode="offline")
    logged = []
    info = {"method": "simplecil", "dataset": "synthetic", "backbone": "vit_test_tiny", "scenario": "B0Inc5"}
    sink.open(tmp_path, {**info, "seed": 1, "group_id": "g", "run_id": "r"}, {}, [])
    monkeypatch.setattr(sink.run, "log", lambda row, **kw: logged.append(row))
    sink.write({"session": 0, "acc": 90.0}, [{"session": 0, "block": 0, "acc": 90.0, "n_test": 10}])
    sink.write({"session": 1, "acc": 80.0}, [{"session": 1, "block": j, "acc": 80.0, "n_test": 10} for j in (0, 1)])
    assert logged == [{"session": 0, "acc": 90.0}, {"session": 1, "acc": 80.0}] and sink.run is not None
    assert caplog.text.count("heat map failed (RuntimeError: no fonts); logging scalars only") == 1
    sink.close({})
