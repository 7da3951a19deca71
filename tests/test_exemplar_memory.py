"""The exemplar memory (pilot/modules/exemplar_memory.py): per-class sizes, herding order against a
direct implementation of iCaRL's rule (as LAMDA-PILOT's ``_construct_exemplar`` runs it), reduction
keeping the herding prefix, random selection fixed by the seed, class means and NME scores against
direct computations, rows, and checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pilot.data.scenario import SessionInfo, make_scenario
from pilot.errors import ConfigError
from pilot.modules.exemplar_memory import ExemplarMemory, check_memory_fits, herding_order, normalise
from pilot.runtime import Runtime

CPU = Runtime(torch.device("cpu"), precision="fp32", progress=False)
PER_CLASS = 10  # training samples per class in the fake sessions


def icarl_herding(vectors: np.ndarray, m: int) -> list[int]:
    """iCaRL's herding written out as LAMDA-PILOT runs it: normalise, then repeatedly take the remaining
    sample whose addition brings the exemplar mean closest to the class mean, deleting it from the pool."""
    vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8)
    class_mean = vectors.mean(axis=0)
    pool, chosen, total = list(range(len(vectors))), [], np.zeros(vectors.shape[1])
    for k in range(1, m + 1):
        candidates = (vectors[pool] + total) / k
        i = int(np.argmin(np.sqrt(((class_mean - candidates) ** 2).sum(axis=1))))
        chosen.append(pool.pop(i))
        total += vectors[chosen[-1]]
    return chosen


def nme_mean(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8)
    mean = vectors.mean(axis=0)
    return mean / np.linalg.norm(mean)


class FakeBatch:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.global_size = images, labels, len(labels)

    def __len__(self) -> int:
        return len(self.labels)


def fake_session(data: torch.Tensor, labels: torch.Tensor, known: int, total: int, index: int) -> SimpleNamespace:
    """A session over ``data`` (the "images" are feature vectors; the sample id is the row): the
    memory's only needs are ``info``, ``pipeline.indices`` and ``sample_batches``."""

    def indices(split: str, classes: range) -> np.ndarray:
        return np.flatnonzero((labels >= classes.start).numpy() & (labels < classes.stop).numpy())

    def sample_batches(ids: np.ndarray, batch_size: int) -> list[FakeBatch]:
        ids_t = torch.as_tensor(ids)
        return [FakeBatch(data[part], labels[part]) for part in ids_t.split(batch_size)]

    info = SessionInfo(index=index, known=known, total=total)
    return SimpleNamespace(info=info, pipeline=SimpleNamespace(indices=indices), sample_batches=sample_batches)


def dataset(classes: int = 4, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(PER_CLASS)
    data = torch.randn(len(labels), dim, generator=gen) + 3 * torch.randn(classes, dim, generator=gen)[labels]
    shuffle = torch.randperm(len(labels), generator=gen)  # classes interleaved, as sample ids are
    return data[shuffle], labels[shuffle]


def test_per_class_follows_pilots_rule_and_a_memory_that_cannot_fit_is_refused():
    total = ExemplarMemory(memory_size=2000, memory_per_class=20, fixed_memory=False)
    assert [total.per_class(t) for t in (10, 30, 100, 7)] == [200, 66, 20, 285]
    fixed = ExemplarMemory(memory_size=2000, memory_per_class=20, fixed_memory=True)
    assert [fixed.per_class(t) for t in (10, 200)] == [20, 20]
    with pytest.raises(ConfigError, match=r"memory_size=50 cannot keep one exemplar per class for the 100 classes"):
        check_memory_fits(50, 20, False, make_scenario(100, 10, 10))
    with pytest.raises(ConfigError, match=r"memory_per_class=0 with method.fixed_memory=true"):
        ExemplarMemory(0, 0, True).check_fits(make_scenario(10, 5, 5))
    check_memory_fits(100, 0, False, make_scenario(100, 10, 10))  # exactly one per class fits


def test_herding_order_is_icarls_rule():
    gen = torch.Generator().manual_seed(3)
    for n, m in ((50, 20), (12, 12), (30, 1)):
        vectors = torch.randn(n, 16, generator=gen) * torch.rand(n, 1, generator=gen) * 5
        order = herding_order(normalise(vectors.double()), m)
        assert order.tolist() == icarl_herding(vectors.double().numpy(), m)
    assert len(herding_order(normalise(torch.randn(4, 3, generator=gen)), 9)) == 4  # at most n


def test_update_herds_new_classes_reduces_old_ones_to_their_prefix_and_recomputes_means():
    data, labels = dataset()
    memory = ExemplarMemory(memory_size=16, memory_per_class=0, fixed_memory=False)
    memory.update(lambda x: x, fake_session(data, labels, 0, 2, 0), CPU, known=0, total=2, batch_size=7)
    expected = {}
    for c in range(2):
        ids = np.flatnonzero(labels.numpy() == c)
        expected[c] = ids[icarl_herding(data[ids].double().numpy(), 8)]
    assert memory.counts() == {0: 8, 1: 8}
    np.testing.assert_array_equal(memory.ids(), np.concatenate([expected[0], expected[1]]))
    np.testing.assert_array_equal(memory.labels.numpy(), [0] * 8 + [1] * 8)
    for c in range(2):
        np.testing.assert_allclose(memory.class_means[c].numpy(), nme_mean(data[expected[c]].numpy()), atol=1e-6)

    # Session 1 with a different network (the features changed): 16 // 4 = 4 per class.
    def changed(x: torch.Tensor) -> torch.Tensor:
        return 2 * x + 1

    memory.update(changed, fake_session(data, labels, 2, 4, 1), CPU, known=2, total=4, batch_size=5)
    assert memory.counts() == {0: 4, 1: 4, 2: 4, 3: 4}
    for c in range(2):  # old classes keep the first 4 of their herding order
        np.testing.assert_array_equal(memory.ids()[4 * c : 4 * c + 4], expected[c][:4])
        np.testing.assert_allclose(
            memory.class_means[c].numpy(), nme_mean(changed(data[expected[c][:4]]).numpy()), atol=1e-6
        )
    for c in (2, 3):
        ids = np.flatnonzero(labels.numpy() == c)
        herded = ids[icarl_herding(changed(data[ids]).double().numpy(), 4)]
        np.testing.assert_array_equal(memory.ids()[4 * c : 4 * c + 4], herded)
        np.testing.assert_allclose(memory.class_means[c].numpy(), nme_mean(changed(data[herded]).numpy()), atol=1e-6)
    rows = memory.to_rows()
    assert [r["rank"] for r in rows] == [0, 1, 2, 3] * 4 and [r["class"] for r in rows] == sorted([0, 1, 2, 3] * 4)
    assert [r["sample_id"] for r in rows] == memory.ids().tolist()


def test_fixed_memory_keeps_every_exemplar_and_caps_at_the_class_size():
    data, labels = dataset()
    memory = ExemplarMemory(memory_size=0, memory_per_class=6, fixed_memory=True)
    memory.update(lambda x: x, fake_session(data, labels, 0, 2, 0), CPU, known=0, total=2)
    first = memory.ids().copy()
    memory.update(lambda x: x, fake_session(data, labels, 2, 4, 1), CPU, known=2, total=4)
    assert memory.counts() == {0: 6, 1: 6, 2: 6, 3: 6}
    np.testing.assert_array_equal(memory.ids()[:12], first)
    big = ExemplarMemory(memory_size=0, memory_per_class=50, fixed_memory=True)  # more than the 10 images a class has
    big.update(lambda x: x, fake_session(data, labels, 0, 2, 0), CPU, known=0, total=2)
    assert big.counts() == {0: PER_CLASS, 1: PER_CLASS}
    assert sorted(big.ids().tolist()) == sorted(np.flatnonzero(labels.numpy() < 2).tolist())


def test_random_selection_is_fixed_by_the_seed_and_reduction_keeps_its_prefix():
    data, labels = dataset()

    def draw(seed: int) -> ExemplarMemory:
        torch.manual_seed(seed)
        memory = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False, selection="random")
        memory.update(lambda x: x, fake_session(data, labels, 0, 2, 0), CPU, known=0, total=2)
        return memory

    a, b, c = draw(7), draw(7), draw(8)
    np.testing.assert_array_equal(a.ids(), b.ids())
    assert a.ids().tolist() != c.ids().tolist()
    assert all(labels[i] == label for i, label in zip(a.ids().tolist(), a.labels.tolist()))
    first = a.ids().copy()
    a.update(lambda x: x, fake_session(data, labels, 2, 4, 1), CPU, known=2, total=4)
    np.testing.assert_array_equal(a.ids()[:3], first[:3])
    np.testing.assert_array_equal(a.ids()[3:6], first[6:9])


def test_nme_logits_are_negative_squared_distances_to_the_class_means():
    data, labels = dataset()
    memory = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False)
    memory.update(lambda x: x, fake_session(data, labels, 0, 4, 0), CPU, known=0, total=4)
    queries = torch.randn(9, data.shape[1], generator=torch.Generator().manual_seed(5)) * 4
    phi = queries.double().numpy()
    phi /= np.linalg.norm(phi, axis=1, keepdims=True) + 1e-8
    means = memory.class_means.double().numpy()
    direct = -((phi[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(memory.nme_logits(queries).numpy(), direct, atol=1e-5)
    assert memory.nme_logits(queries).shape == (9, 4) and memory.nme_logits(queries).dtype == torch.float32


def test_state_dict_restores_a_memory_of_any_size():
    data, labels = dataset()
    memory = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False)
    memory.update(lambda x: x, fake_session(data, labels, 0, 2, 0), CPU, known=0, total=2)
    fresh = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False)
    fresh.load_state_dict(memory.state_dict())
    np.testing.assert_array_equal(fresh.ids(), memory.ids())
    torch.testing.assert_close(fresh.class_means, memory.class_means, rtol=0, atol=0)
    assert fresh.counts() == memory.counts() == {0: 6, 1: 6}
