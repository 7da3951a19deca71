"""Every metric pinned on hand-made accuracy matrices (values computed by hand in the comments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pilot.data.scenario import Scenario
from pilot.eval import metrics
from pilot.eval.evaluator import Evaluator

NAN = np.nan
# Three sessions with unequal test sizes (100, 50, 50 images).
R3 = np.array([[90.0, NAN, NAN], [80.0, 70.0, NAN], [85.0, 60.0, 50.0]])
N3 = np.array([100, 50, 50])


def test_accuracy_is_sample_weighted():
    # k=1: (100*80 + 50*70) / 150 = 76.667; k=2: (100*85 + 50*60 + 50*50) / 200 = 70
    np.testing.assert_allclose(metrics.accuracy(R3, N3), [90.0, 76.666667, 70.0], atol=1e-5)


def test_average_incremental_accuracy_is_the_running_mean():
    np.testing.assert_allclose(
        metrics.average_incremental_accuracy([90.0, 76.666667, 70.0]), [90.0, 83.333333, 78.888889], atol=1e-5
    )


def test_forgetting_uses_the_best_past_accuracy():
    # k=1: 90-80 = 10; k=2: block 0 best 90 -> 85: 5, block 1 best 70 -> 60: 10; mean 7.5
    f = metrics.forgetting(R3)
    assert np.isnan(f[0])
    np.testing.assert_allclose(f[1:], [10.0, 7.5])


def test_backward_transfer_compares_with_the_accuracy_just_after_learning():
    # k=1: 80-90 = -10; k=2: ((85-90) + (60-70)) / 2 = -7.5
    np.testing.assert_allclose(metrics.backward_transfer(R3)[1:], [-10.0, -7.5])


def test_old_and_new_accuracy():
    np.testing.assert_allclose(metrics.old_accuracy(R3, N3)[1:], [80.0, 76.666667], atol=1e-5)
    np.testing.assert_allclose(metrics.new_accuracy(R3), [90.0, 70.0, 50.0])


def test_negative_forgetting_when_old_sessions_improve():
    R = np.array([[50.0, NAN], [60.0, 40.0]])
    assert metrics.forgetting(R)[1] == pytest.approx(-10.0)
    assert metrics.backward_transfer(R)[1] == pytest.approx(10.0)


def test_forgetting_best_past_is_not_only_the_diagonal():
    # block 0 peaks after session 1 (95), then drops to 70: forgetting counts from the peak.
    R = np.array([[80.0, NAN, NAN], [95.0, 60.0, NAN], [70.0, 60.0, 90.0]])
    assert metrics.forgetting(R)[2] == pytest.approx(((95 - 70) + (60 - 60)) / 2)
    assert metrics.backward_transfer(R)[2] == pytest.approx(((70 - 80) + (60 - 60)) / 2)


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError, match="square"):
        metrics.forgetting(np.zeros((2, 3)))


def test_evaluator_fills_rows_from_logits():
    # 3 classes in sessions [2, 1]; labels 0,1 in block 0 and label 2 in block 1.
    ev = Evaluator(Scenario(class_order=(0, 1, 2), sizes=(2, 1)))
    ev.start_session(0)
    ev.update(torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 1, 1]))  # hits: yes, no, yes
    r0 = ev.end_session()
    assert r0["acc"] == pytest.approx(200 / 3) and np.isnan(r0["forgetting"])
    ev.start_session(1)
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 3.0, 1.0], [0.0, 1.0, 2.0], [5.0, 1.0, 2.0]])
    ev.update(logits, torch.tensor([0, 1, 2, 2]))  # hits: yes, yes, yes, no
    r1 = ev.end_session()
    np.testing.assert_allclose(ev.R[1, :2], [100.0, 50.0])
    assert ev.n.tolist() == [2, 2]
    assert r1["acc"] == pytest.approx(75.0)
    assert r1["acc_old"] == pytest.approx(100.0) and r1["acc_new"] == pytest.approx(50.0)
    assert r1["forgetting"] == pytest.approx(200 / 3 - 100.0)  # block 0 improved: negative
    assert r1["acc_top5"] == pytest.approx(100.0)  # 3 classes: top-3 always hits
    assert [row["block"] for row in ev.matrix_rows(1)] == [0, 1]


def test_evaluator_state_round_trip():
    ev = Evaluator(Scenario(class_order=(0, 1), sizes=(1, 1)))
    ev.start_session(0)
    ev.update(torch.tensor([[1.0]]), torch.tensor([0]))
    ev.end_session()
    other = Evaluator(Scenario(class_order=(0, 1), sizes=(1, 1)))
    other.load_state_dict(ev.state_dict())
    np.testing.assert_array_equal(other.R, ev.R)
    assert other.sessions_done == 1
