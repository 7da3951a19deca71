"""Class order, session sizes and label remapping against the reference protocol (docs/methods.md §0.2)."""

from __future__ import annotations

import numpy as np
import pytest

from pilot.data.scenario import Scenario, make_class_order, make_scenario, make_session_sizes
from pilot.errors import ConfigError

CIFAR100_SEED1993 = [
    int(c)
    for c in """68 56 78 8 23 84 90 65 74 76 40 89 3 92 55 9 26 80 43 38 58 70 77 1 85
19 17 50 28 53 13 81 45 82 6 59 83 16 15 44 91 41 72 60 79 52 20 10 31 54 37 95 14 71 96 98 97 2 64 66 42
22 35 86 24 34 87 21 99 0 88 27 18 94 11 12 47 25 30 46 62 69 36 61 7 63 75 5 32 4 51 48 73 93 39 67 29 49
57 33""".split()
]


def test_cifar100_order_for_seed_1993():
    order = make_class_order(100, "shuffle", 1993)
    assert order[:20] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]
    assert order == CIFAR100_SEED1993


def test_imagenet_r_first_session_for_seed_1993():
    order = make_class_order(200, "shuffle", 1993)
    assert order[:20] == [168, 136, 51, 9, 183, 101, 171, 99, 42, 159, 191, 70, 16, 188, 27, 10, 175, 26, 68, 187]


def test_natural_and_explicit_orders():
    assert make_class_order(5, "natural", 0) == [0, 1, 2, 3, 4]
    assert make_class_order(3, [2, 0, 1], 0) == [2, 0, 1]
    with pytest.raises(ConfigError, match="exactly once"):
        make_class_order(3, [0, 0, 1], 0)
    with pytest.raises(ConfigError, match="shuffle"):
        make_class_order(3, "random", 0)


@pytest.mark.parametrize(
    "n, init, inc, sizes",
    [
        (100, 10, 10, [10] * 10),  # CIFAR B0Inc10
        (200, 20, 20, [20] * 10),  # ImageNet-R B0Inc20
        (100, 5, 5, [5] * 20),  # CIFAR B0Inc5 (EASE)
        (100, 50, 10, [50, 10, 10, 10, 10, 10]),
        (10, 3, 3, [3, 3, 3, 1]),  # remainder session
        (10, 10, 10, [10]),
        (7, 4, 5, [4, 3]),  # the last increment does not fit: remainder
    ],
)
def test_session_sizes(n, init, inc, sizes):
    assert make_session_sizes(n, init, inc) == sizes


def test_impossible_splits_are_refused():
    with pytest.raises(ConfigError, match="exceeds the 10 classes"):
        make_session_sizes(10, 20, 10)
    with pytest.raises(ConfigError, match=">= 1"):
        make_session_sizes(10, 2, 0)


def test_labels_are_remapped_so_sessions_are_contiguous():
    sc = make_scenario(10, 4, 3, "shuffle", 1993)
    assert sc.sizes == (4, 3, 3)
    assert [(s.known, s.total) for s in sc.sessions] == [(0, 4), (4, 7), (7, 10)]
    remapped = sc.remap(np.array(sc.class_order))
    assert remapped.tolist() == list(range(10))  # class order[i] -> label i
    assert sc.session_of_label.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sc.name == "B4Inc3"
    assert make_scenario(100, 10, 10).name == "B0Inc10"
    assert make_scenario(100, 50, 10).name == "B50Inc10"
    # The label is the real split: a smaller last session shows, one session says so.
    assert make_scenario(95, 10, 10).name == "B0Inc10r5"
    assert make_scenario(23, 5, 5).name == "B0Inc5r3"
    assert make_scenario(10, 10, 10).name == "B10Inc0"
    assert Scenario(tuple(range(9)), (4, 2, 3)).name == "S4-2-3"
