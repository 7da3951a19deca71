"""Class-incremental scenarios as data: a class order and a list of session sizes.

Follows the reference protocol (docs/methods.md §0.2): the class order is a numpy permutation seeded
with the run seed (1993 by default), the natural order, or an explicit list; labels are remapped so
that class ``order[i]`` becomes label ``i``; session ``t`` then holds the contiguous label range
``[known_t, known_t + size_t)``.

Two evaluation settings travel with the scenario, because they define what the numbers of a run
mean rather than how fast it runs: ``val_fraction``, the share of each class's training images held
out as a validation set (the split itself is drawn by :class:`pilot.data.pipeline.DataPipeline`), and
``shuffle_test``, whether test (and validation) images reach the learner in a seeded random order
instead of class by class.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Iterable, Sequence

import numpy as np
from annotated_types import Ge, Lt

from pilot.errors import ConfigError
from pilot.schema import ClassOrder, PositiveInt, Seed

log = logging.getLogger(__name__)


def make_class_order(num_classes: int, order: str | Sequence[int], seed: int) -> list[int]:
    """The original class ids in the order they are learned.

    ``order``: ``"shuffle"`` -> ``np.random.seed(seed); np.random.permutation(num_classes)`` (the
    legacy global-RNG call of PyCIL/LAMDA-PILOT, stable across numpy versions); ``"natural"`` ->
    ``0..num_classes-1``; a list -> used as given after checking it is a permutation.
    """
    if isinstance(order, str):
        if order == "shuffle":
            np.random.seed(seed)
            return [int(c) for c in np.random.permutation(num_classes)]
        if order == "natural":
            return list(range(num_classes))
        raise ConfigError(f"scenario.class_order={order!r} is not 'shuffle', 'natural' or a list of class ids")
    if not isinstance(order, Iterable):
        raise ConfigError(
            f"scenario.class_order={order!r} is not 'shuffle', 'natural' or a list of class ids "
            f"(a permutation of 0..{num_classes - 1})"
        )
    return _checked_permutation(num_classes, list(order))


def _checked_permutation(num_classes: int, order: list[Any]) -> list[int]:
    """``order`` as ints, after checking it lists each class id ``0..num_classes-1`` exactly once."""
    for position, c in enumerate(order):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ConfigError(
                f"scenario.class_order[{position}]={c!r} is not a class id; the list must hold integers "
                f"0..{num_classes - 1}"
            )
    ids = [int(c) for c in order]
    counts = Counter(ids)
    problems = []
    outside = sorted(c for c in counts if not 0 <= c < num_classes)
    if outside:
        problems.append(f"ids outside 0..{num_classes - 1}: {_few(outside)}")
    repeated = sorted(c for c, n in counts.items() if n > 1)
    if repeated:
        problems.append(f"ids listed more than once: {_few(repeated)}")
    missing = sorted(set(range(num_classes)) - set(counts))
    if missing:
        problems.append(f"ids missing: {_few(missing)}")
    if problems:
        raise ConfigError(
            f"scenario.class_order must list each of the {num_classes} class ids 0..{num_classes - 1} exactly once; "
            f"got {len(ids)} ids with {'; '.join(problems)}. Fix the list, or use scenario.class_order=shuffle "
            "or natural."
        )
    return ids


def _few(ids: list[int], shown: int = 10) -> str:
    return str(ids[:shown])[:-1] + (f", ... ({len(ids)} in all)]" if len(ids) > shown else "]")


def make_session_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """``[init_cls]``, then ``increment`` while the running sum plus one more increment stays below
    ``num_classes``, then one final session with the remainder (docs/methods.md §0.2)."""
    if init_cls < 1 or increment < 1:
        hint = ""
        if init_cls == 0 and increment >= 1:
            hint = f" (B0Inc{increment} means a first session of {increment} classes: scenario.init_cls={increment})"
        raise ConfigError(f"scenario.init_cls={init_cls} and scenario.increment={increment} must both be >= 1{hint}")
    if init_cls > num_classes:
        raise ConfigError(
            f"scenario.init_cls={init_cls} exceeds the {num_classes} classes of the dataset; "
            f"choose init_cls <= {num_classes}"
        )
    sizes = [init_cls]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if sum(sizes) < num_classes:
        sizes.append(num_classes - sum(sizes))
    _warn_about_unusual_split(num_classes, init_cls, increment, sizes)
    return sizes


def _warn_about_unusual_split(num_classes: int, init_cls: int, increment: int, sizes: list[int]) -> None:
    """Splits the reference protocol accepts but that are rarely meant: say what they become."""
    if len(sizes) == 1:
        log.warning(
            "scenario.init_cls=%d covers all %d classes: one session, no incremental step (joint training). "
            "Choose init_cls < %d for a class-incremental run.",
            init_cls,
            num_classes,
            num_classes,
        )
    elif increment > num_classes - init_cls:
        log.warning(
            "scenario.increment=%d is larger than the %d classes left after init_cls=%d: the only incremental "
            "session has %d classes (sessions %s).",
            increment,
            num_classes - init_cls,
            init_cls,
            sizes[-1],
            sizes,
        )


@dataclass(frozen=True)
class SessionInfo:
    """What a learner knows about a session before seeing its data."""

    index: int
    known: int  # classes learned before this session
    total: int  # classes seen once this session is learned

    @property
    def num_new(self) -> int:
        return self.total - self.known

    @property
    def new_classes(self) -> range:
        return range(self.known, self.total)


@dataclass(frozen=True)
class Scenario:
    """A class order and the session sizes over it. Labels in the run are positions in the order."""

    class_order: tuple[int, ...]
    sizes: tuple[int, ...]
    val_fraction: float = 0.0  # share of each class's training images held out for validation
    shuffle_test: bool = False  # evaluate on a seeded random order instead of class-sorted batches

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or sum(self.sizes) != len(self.class_order):
            raise ConfigError(
                f"session sizes {list(self.sizes)} must be >= 1 each and add up to the {len(self.class_order)} "
                "classes of the class order"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"scenario.val_fraction={self.val_fraction} must be in [0, 1) (0: no validation set)")

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_sessions(self) -> int:
        return len(self.sizes)

    @cached_property
    def sessions(self) -> tuple[SessionInfo, ...]:
        bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        return tuple(SessionInfo(t, int(bounds[t]), int(bounds[t + 1])) for t in range(len(self.sizes)))

    @cached_property
    def session_of_label(self) -> np.ndarray:
        """``session_of_label[y]`` = the session in which (remapped) label ``y`` is learned."""
        return np.repeat(np.arange(len(self.sizes)), self.sizes)

    def remap(self, original_labels: np.ndarray) -> np.ndarray:
        """Original dataset labels -> positions in the class order."""
        position = np.empty(self.num_classes, dtype=np.int64)
        position[list(self.class_order)] = np.arange(self.num_classes)
        return position[np.asarray(original_labels)]

    @property
    def name(self) -> str:
        """The split as a label, read off the real session sizes: ``B{base}Inc{increment}``, base 0
        when the first session is as large as the others; ``r{n}`` appended when the last session
        holds a smaller remainder of ``n`` classes (``[10] * 9 + [5]`` -> ``B0Inc10r5``); ``Inc0`` for
        a single session; any other list of sizes is spelled out (``S4-2-3``)."""
        first, rest = self.sizes[0], self.sizes[1:]
        if not rest:
            return f"B{first}Inc0"
        inc = rest[0]
        base = 0 if first == inc else first
        if all(size == inc for size in rest):
            return f"B{base}Inc{inc}"
        if len(rest) > 1 and all(size == inc for size in rest[:-1]) and rest[-1] < inc:
            return f"B{base}Inc{inc}r{rest[-1]}"
        return "S" + "-".join(str(size) for size in self.sizes)


def make_scenario(
    num_classes: int,
    init_cls: PositiveInt,
    increment: PositiveInt,
    class_order: ClassOrder = "shuffle",
    order_seed: Seed = 1993,
    val_fraction: Annotated[float, Ge(0), Lt(1)] = 0.0,
    shuffle_test: bool = False,
) -> Scenario:
    """Build a :class:`Scenario` from the ``scenario`` config group (``num_classes`` from the dataset).

    ``val_fraction``: hold out this share of every class's training images (at least one image per
    class when > 0) as a validation set that learners never train on; 0 = no validation set.
    ``shuffle_test``: evaluate on test images in a seeded random order (false: class-sorted, as the
    reference does), so that batch-wise prompt voting no longer sees batches of one class."""
    order = make_class_order(num_classes, class_order, order_seed)
    sizes = make_session_sizes(num_classes, init_cls, increment)
    return Scenario(tuple(order), tuple(sizes), float(val_fraction), bool(shuffle_test))
