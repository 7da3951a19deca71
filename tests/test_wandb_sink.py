"""W&B offline: the run file holds the resolved config and the same per-session scalars as the CSV."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_config

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version
BLOCK = 32768


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Parse a ``.wandb`` transaction log (LevelDB log format: 7-byte record headers of crc32,
    little-endian length and type FULL=1/FIRST=2/MIDDLE=3/LAST=4, in 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    """W&B items name their key in ``key`` or, in newer versions, in ``nested_key``."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_offline_wandb_receives_config_and_session_scalars(tmp_path, fast):
    overrides = [o for o in fast if o != "logger=csv"] + ["+method=simplecil", "logger=wandb", "scenario=b0inc5"]
    run_dir = tmp_path / "run"
    run_config(overrides, run_dir)
    sessions = pd.read_csv(run_dir / "sessions.csv")
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].name == f"run-{(run_dir / 'wandb_id.txt').read_text()}.wandb"
    # wandb's service process may still be flushing the offline file when finish() returns: poll.
    deadline = time.monotonic() + 20
    while True:
        records = read_wandb_records(files[0])
        history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        if len(history) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [h["_step"] for h in history] == [0, 1]
    for row, logged in zip(sessions.itertuples(), history):
        assert logged["acc"] == pytest.approx(row.acc, abs=1e-4)
        assert logged["n_seen"] == row.n_seen
    config = {}  # the resolved config comes with the run record, later additions as config records
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update(_items(r.run.config.update))
        elif kind == "config":
            config.update(_items(r.config.update))
    assert config["method"]["_target_"] == "pilot.learners.simplecil.SimpleCIL"
    assert config["scenario"]["init_cls"] == 5 and config["seed"] == 1993
    assert config["pilot"]["run_id"] == sessions["run_id"].iloc[0]


def test_a_wandb_failure_never_loses_the_csv(tmp_path, fast, monkeypatch, caplog):
    def broken_init(**kwargs):
        raise RuntimeError("W&B service unavailable")

    monkeypatch.setattr(wandb, "init", broken_init)
    overrides = [o for o in fast if o != "logger=csv"] + ["+method=simplecil", "logger=wandb", "scenario=b0inc5"]
    run_config(overrides, tmp_path / "run")
    assert pd.read_csv(tmp_path / "run" / "sessions.csv")["session"].tolist() == [0, 1]
    assert "W&B open failed (RuntimeError: W&B service unavailable)" in caplog.text
